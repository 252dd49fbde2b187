"""SPEC §1 against numbers worked out by hand (the arithmetic is in the comments).

Shared 2-pair batch:
    L_θ(y_w) = [-10, -8]   L_θ(y_l) = [-12, -8]   n_w = [2, 4]   n_l = [4, 2]
    L_ref(y_w) = [-11, -9] L_ref(y_l) = [-11, -7]
  no LN:  Δθ = [2, 0],   Δref = [0, -2]          → z(α=1) = [2, 2]
  LN:     ℓθw = [-5, -2], ℓθl = [-3, -4] → Δθ = [-2, 2]
          ℓrw = [-5.5, -2.25], ℓrl = [-2.75, -3.5] → Δref = [-2.75, 1.25]
Entropies are chosen so that the per-token normalized terms H/(n ln V) are (0.5, 0.5) and (0.1, 0.3):
    h = [0.5, 0.2] → φ = −0.29·ln h = [0.29·ln 2, 0.29·ln 5] ≈ [0.201013, 0.466737]
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from rainbowpo.objective import LINKS, ObjectiveConfig, preference_loss

V = 64
LN_V = math.log(V)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def batch(dtype=torch.float64, requires_grad=False):
    t = lambda xs: torch.tensor(xs, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    ref = lambda xs: torch.tensor(xs, dtype=dtype)  # noqa: E731
    n_w, n_l = torch.tensor([2, 4]), torch.tensor([4, 2])
    return dict(
        policy_chosen=t([-10.0, -8.0]),
        policy_rejected=t([-12.0, -8.0]),
        chosen_tokens=n_w,
        rejected_tokens=n_l,
        ref_chosen=ref([-11.0, -9.0]),
        ref_rejected=ref([-11.0, -7.0]),
        ref_chosen_entropy=ref([0.5 * 2 * LN_V, 0.1 * 4 * LN_V]),
        ref_rejected_entropy=ref([0.5 * 4 * LN_V, 0.3 * 2 * LN_V]),
        vocab_size=V,
    )


PHI = [0.29 * math.log(2), 0.29 * math.log(5)]


def loss_of(preset, **overrides):
    return preference_loss(ObjectiveConfig.from_preset(preset, **overrides), **batch())


# ----------------------------------------------------------------------------- presets


def test_dpo_preset():
    # z = [2, 2]; u = 0.1·2 = 0.2; loss = softplus(−0.2) = 0.598139
    out = loss_of("dpo")
    assert out.losses.tolist() == pytest.approx([softplus(-0.2)] * 2)
    assert out.losses[0].item() == pytest.approx(0.5981388693815918)
    # rewards: 0.1·(L_θ − L_ref): chosen [0.1, 0.1], rejected [−0.1, −0.1]
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, -0.1])
    assert out.phi.tolist() == [1.0, 1.0]
    assert out.z.tolist() == [2.0, 2.0]


def test_ipo_preset():
    # LN: z = Δθ − Δref = [−2 + 2.75, 2 − 1.25] = [0.75, 0.75]; u = 0.075; (0.075 − 0.5)² = 0.180625
    assert loss_of("ipo").losses.tolist() == pytest.approx([0.180625, 0.180625])


def test_hinge_preset():
    # z = [2, 2]; u = 0.2; max(0, 1 − 0.2) = 0.8
    assert loss_of("hinge").losses.tolist() == pytest.approx([0.8, 0.8])


def test_simpo_preset():
    # LN, α = 0, m = 0.25: z = Δθ − m = [−2.25, 1.75]; u = 2·z = [−4.5, 3.5]
    # loss = [softplus(4.5), softplus(−3.5)] ≈ [4.511048, 0.029750]
    out = loss_of("simpo")
    assert out.losses.tolist() == pytest.approx([softplus(4.5), softplus(-3.5)])
    assert out.losses.tolist() == pytest.approx([4.511048, 0.029750], abs=1e-6)
    # rewards 2·ℓθ: chosen [−10, −4], rejected [−6, −8]
    assert out.chosen_rewards.tolist() == pytest.approx([-10.0, -4.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-6.0, -8.0])


def test_mallows_dpo_preset():
    # z = [2, 2]; u = 0.1·φ·2 = [0.0402025, 0.0933474]
    out = loss_of("mallows_dpo")
    assert out.phi.tolist() == pytest.approx(PHI)
    assert out.phi.tolist() == pytest.approx([0.2010127, 0.4667371], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([softplus(-0.2 * PHI[0]), softplus(-0.2 * PHI[1])])


def test_rainbowpo_preset():
    # LN, α = 0.25, γ = 0.1: z = Δθ − 0.25·Δref − 0.75·0.1
    #   = [−2 + 0.6875 − 0.075, 2 − 0.3125 − 0.075] = [−1.3875, 1.6125]
    # u = 10·φ·z ≈ [−2.789051, 7.526134]
    out = loss_of("rainbowpo")
    z = [-1.3875, 1.6125]
    assert out.z.tolist() == pytest.approx(z)
    u = [10 * PHI[0] * z[0], 10 * PHI[1] * z[1]]
    assert u == pytest.approx([-2.789051, 7.526134], abs=1e-5)
    assert out.losses.tolist() == pytest.approx([softplus(-u[0]), softplus(-u[1])])
    # chosen reward 10·(ℓθw − 0.25·ℓrw) = 10·([−5, −2] − 0.25·[−5.5, −2.25]) = [−36.25, −14.375]
    assert out.chosen_rewards.tolist() == pytest.approx([-36.25, -14.375])
    # rejected 10·([−3, −4] − 0.25·[−2.75, −3.5]) = [−23.125, −31.25]
    assert out.rejected_rewards.tolist() == pytest.approx([-23.125, -31.25])


def test_preset_table_is_spec():
    rows = {
        "dpo": (0.1, "logistic", False, 1, 0, 0, False, 0),
        "ipo": (0.1, "squared", True, 1, 0, 0, False, 0),
        "hinge": (0.1, "hinge", False, 1, 0, 0, False, 0),
        "simpo": (2.0, "logistic", True, 0, 0, 0.25, False, 0),
        "mallows_dpo": (0.1, "logistic", False, 1, 0, 0, True, 0),
        "rainbowpo": (10, "logistic", True, 0.25, 0.1, 0, True, 0),
    }
    keys = (
        "beta",
        "link",
        "length_norm",
        "mix_alpha",
        "mix_gamma",
        "margin",
        "contextual_scaling",
        "sft_weight",
    )
    for name, values in rows.items():
        cfg = ObjectiveConfig.from_preset(name)
        assert tuple(getattr(cfg, k) for k in keys) == values, name
        assert cfg.dispersion == 0.29 and cfg.label_smoothing == 0
    assert ObjectiveConfig.from_preset("rainbowpo", beta=5.0).beta == 5.0
    assert ObjectiveConfig.from_preset("simpo").needs_reference is False
    assert ObjectiveConfig.from_preset("mallows_dpo").needs_entropy is True
    assert ObjectiveConfig.from_preset("dpo").needs_entropy is False


# ----------------------------------------------------------------------------- identities


def test_dpo_is_minus_logsigmoid():
    b = batch()
    out = preference_loss(ObjectiveConfig(beta=0.3), **b)
    d = (b["policy_chosen"] - b["policy_rejected"]) - (b["ref_chosen"] - b["ref_rejected"])
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(0.3 * d))


def test_simpo_needs_no_reference():
    b = {k: v for k, v in batch().items() if not k.startswith("ref") and k != "vocab_size"}
    out = preference_loss(ObjectiveConfig.from_preset("simpo"), **b)
    mean_w = b["policy_chosen"] / b["chosen_tokens"]
    mean_l = b["policy_rejected"] / b["rejected_tokens"]
    torch.testing.assert_close(
        out.losses, -torch.nn.functional.logsigmoid(2.0 * (mean_w - mean_l) - 2.0 * 0.25)
    )


def test_ipo_is_squared_of_beta_z():
    out = loss_of("ipo", beta=0.7)
    torch.testing.assert_close(out.losses, (0.7 * out.z - 0.5) ** 2)


def test_label_smoothing_near_half_is_symmetric():
    # ε → 0.5: (1−ε)·softplus(−u) + ε·softplus(u) → ½(softplus(−0.2) + softplus(0.2))
    out = loss_of("dpo", label_smoothing=0.5 - 1e-9)
    assert out.losses.tolist() == pytest.approx([0.5 * (softplus(-0.2) + softplus(0.2))] * 2)


def test_alpha_one_ignores_gamma_and_alpha_zero_ignores_reference():
    torch.testing.assert_close(loss_of("dpo", mix_gamma=5.0).losses, loss_of("dpo").losses)
    a = loss_of("simpo")
    b = batch()
    b["ref_chosen"], b["ref_rejected"] = b["ref_chosen"] * 100, b["ref_rejected"] - 3
    torch.testing.assert_close(preference_loss(ObjectiveConfig.from_preset("simpo"), **b).losses, a.losses)


def test_margin_in_log_ratio_units():
    # dpo with m = 1: z = 2 − 1 = 1; u = 0.1 → softplus(−0.1)
    assert loss_of("dpo", margin=1.0).losses.tolist() == pytest.approx([softplus(-0.1)] * 2)


def test_sft_term():
    # no LN: + λ·(−L_θ(y_w)) = 0.5·[10, 8]; LN: 0.5·[5, 2]
    base, with_sft = loss_of("dpo"), loss_of("dpo", sft_weight=0.5)
    assert (with_sft.losses - base.losses).tolist() == pytest.approx([5.0, 4.0])
    base_ln, sft_ln = loss_of("ipo"), loss_of("ipo", sft_weight=0.5)
    assert (sft_ln.losses - base_ln.losses).tolist() == pytest.approx([2.5, 1.0])


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("link", sorted(LINKS))
@pytest.mark.parametrize("scaling", [False, True])
def test_gradcheck(link, scaling):
    cfg = ObjectiveConfig(beta=0.5, link=link, length_norm=True, mix_alpha=0.5, mix_gamma=0.2,
                          margin=0.1, contextual_scaling=scaling, sft_weight=0.3, label_smoothing=0.1)  # fmt: skip
    b = batch()
    fixed = {k: v for k, v in b.items() if k not in ("policy_chosen", "policy_rejected")}

    def f(pc, pr):
        return preference_loss(cfg, pc, pr, **fixed).losses

    pc = torch.tensor([-10.0, -8.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-12.0, -8.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (pc, pr))


def test_no_gradient_to_reference_or_phi():
    b = batch()
    for k in ("ref_chosen", "ref_rejected", "ref_chosen_entropy", "ref_rejected_entropy"):
        b[k] = b[k].clone().requires_grad_(True)
    b["policy_chosen"].requires_grad_(True)
    out = preference_loss(ObjectiveConfig.from_preset("rainbowpo"), **b)
    assert out.phi.grad_fn is None and out.z.grad_fn is None and out.chosen_rewards.grad_fn is None
    out.losses.sum().backward()
    assert b["policy_chosen"].grad is not None
    for k in ("ref_chosen", "ref_rejected", "ref_chosen_entropy", "ref_rejected_entropy"):
        assert b[k].grad is None, k


# ----------------------------------------------------------------------------- contextual scaling


def test_uniform_reference_gives_phi_zero_and_constant_loss():
    b = batch()
    b["ref_chosen_entropy"] = b["chosen_tokens"].double() * LN_V  # h = 1
    b["ref_rejected_entropy"] = b["rejected_tokens"].double() * LN_V
    out = preference_loss(ObjectiveConfig.from_preset("mallows_dpo"), **b)
    assert out.phi.abs().max().item() < 1e-12
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2)  # ψ(0) = softplus(0)


def test_lower_entropy_gives_larger_phi_and_zero_entropy_is_finite():
    out = loss_of("mallows_dpo")
    assert out.phi[1] > out.phi[0]  # h 0.2 < 0.5
    b = batch()
    b["ref_chosen_entropy"] = torch.zeros(2, dtype=torch.float64)
    b["ref_rejected_entropy"] = torch.zeros(2, dtype=torch.float64)
    zero = preference_loss(ObjectiveConfig.from_preset("mallows_dpo"), **b)
    assert zero.phi.tolist() == pytest.approx([-0.29 * math.log(1e-12)] * 2)
    assert torch.isfinite(zero.losses).all()


# ----------------------------------------------------------------------------- dtypes and shapes


def test_dtype_preserved_and_inputs_untouched():
    for dtype in (torch.float32, torch.float64):
        b = batch(dtype)
        before = {k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)}
        out = preference_loss(ObjectiveConfig.from_preset("rainbowpo"), **b)
        assert out.losses.dtype == dtype and out.chosen_rewards.dtype == dtype
        for k, v in before.items():
            assert torch.equal(b[k], v), k


def test_single_pair_and_empty_batch():
    b1 = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in batch().items()}
    out = preference_loss(ObjectiveConfig.from_preset("rainbowpo"), **b1)
    assert out.losses.shape == (1,)
    b0 = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in batch().items()}
    empty = preference_loss(ObjectiveConfig.from_preset("rainbowpo"), **b0)
    assert empty.losses.shape == (0,) and empty.phi.shape == (0,)
    assert not torch.isnan(empty.losses.sum())


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [("beta", 0.0), ("beta", -1.0), ("mix_alpha", 1.5), ("mix_alpha", -0.1), ("link", "cubic"),
     ("label_smoothing", 0.5), ("label_smoothing", -0.1), ("sft_weight", -1.0), ("dispersion", 0.0),
     ("beta", float("nan")), ("margin", float("inf"))],
)  # fmt: skip
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ObjectiveConfig(**{field: value})


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="preset"):
        ObjectiveConfig.from_preset("kto")
    with pytest.raises(ValueError, match="betta"):
        ObjectiveConfig.from_preset("dpo", betta=1.0)


@pytest.mark.parametrize(
    "preset, missing",
    [("dpo", "ref_chosen"), ("dpo", "ref_rejected"), ("mallows_dpo", "ref_chosen_entropy"),
     ("rainbowpo", "ref_rejected_entropy"), ("rainbowpo", "vocab_size")],
)  # fmt: skip
def test_missing_tensor_is_named(preset, missing):
    b = batch()
    b[missing] = None
    with pytest.raises(ValueError, match=missing):
        preference_loss(ObjectiveConfig.from_preset(preset), **b)


def test_shape_mismatch():
    b = batch()
    b["policy_rejected"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="policy_rejected"):
        preference_loss(ObjectiveConfig.from_preset("dpo"), **b)


def test_objective_imports_torch_only():
    source = (pathlib.Path(__file__).parents[2] / "rainbowpo" / "objective.py").read_text()
    imports = {
        line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= {"__future__", "math", "dataclasses", "typing", "torch"}, imports
