"""The RainbowPO objective (SPEC §1): DPO and its improvements as fields of one formula.

    z   = Δθ − α·Δref − (1 − α)·γ − m                    mixed reference (α, γ) + home advantage (m)
    u   = β · φ · z                                       φ: Mallows contextual scaling (detached)
    ℓ   = ψ(u) + λ · (−ℓθ(y_w))                            ψ: link (logistic | hinge | squared), λ: SFT

with ℓ(y) = L(y)/n(y) under length normalization (SimPO, RainbowPO §3.1) and
φ = −c·ln h, h = ½·(H_ref(y_w)/(n_w ln V) + H_ref(y_l)/(n_l ln V)) (Mallows-DPO; per-token mean).

Tensors in, tensors out: per-pair losses and detached rewards, no reduction, no I/O, no distributed.

    >>> cfg = ObjectiveConfig.from_preset("rainbowpo", beta=5.0)
    >>> out = preference_loss(cfg, pc, pr, nc, nr, ref_chosen=rc, ref_rejected=rr,
    ...                       ref_chosen_entropy=hc, ref_rejected_entropy=hr, vocab_size=V)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: Link functions ψ(u, ε). A new link is one entry here (ε is the cDPO label smoothing).
LINKS = {
    "logistic": lambda u, eps: (1 - eps) * F.softplus(-u) + eps * F.softplus(u),  # DPO / cDPO
    "hinge": lambda u, eps: torch.relu(1 - u),  # SLiC
    "squared": lambda u, eps: (u - 0.5) ** 2,  # IPO as written in the RainbowPO paper
}

#: SPEC §1 preset table — data, not branches. Any field can be overridden in `from_preset`.
PRESETS: dict[str, dict] = {
    "dpo": dict(beta=0.1, link="logistic"),
    "ipo": dict(beta=0.1, link="squared", length_norm=True),
    "hinge": dict(beta=0.1, link="hinge"),
    "simpo": dict(beta=2.0, link="logistic", length_norm=True, mix_alpha=0.0, margin=0.25),
    "mallows_dpo": dict(beta=0.1, link="logistic", contextual_scaling=True),
    "rainbowpo": dict(
        beta=10.0, link="logistic", length_norm=True, mix_alpha=0.25, mix_gamma=0.1, contextual_scaling=True
    ),
}


@dataclass(frozen=True)
class ObjectiveConfig:
    """One point in the RainbowPO design space; defaults are plain DPO (β = 0.1)."""

    beta: float = 0.1
    """β > 0: inverse temperature of the implicit reward."""
    link: str = "logistic"
    """ψ: one of LINKS (logistic = DPO, hinge = SLiC, squared = IPO)."""
    length_norm: bool = False
    """Divide sequence log-likelihoods by the response token count (SimPO / R-DPO direction)."""
    mix_alpha: float = 1.0
    """α ∈ [0, 1]: weight of π_ref in the mixed reference π_ref^α·π_γ^(1−α); 0 = reference-free."""
    mix_gamma: float = 0.0
    """γ: per-token log-ratio of the ideal policy π_γ (used with weight 1 − α)."""
    margin: float = 0.0
    """m: home advantage in log-ratio units (a reward margin g is m = g/β)."""
    contextual_scaling: bool = False
    """Mallows-DPO: scale β by φ = −c·ln(normalized reference entropy)."""
    dispersion: float = 0.29
    """c > 0 of the Mallows scaling φ."""
    sft_weight: float = 0.0
    """λ ≥ 0: weight of the SFT term −ℓθ(y_w)."""
    label_smoothing: float = 0.0
    """ε ∈ [0, 0.5): conservative DPO label smoothing (logistic link)."""

    def __post_init__(self) -> None:
        for name in (
            "beta",
            "mix_alpha",
            "mix_gamma",
            "margin",
            "dispersion",
            "sft_weight",
            "label_smoothing",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"objective.{name}: expected a finite number, got {value!r}")
        checks = [  # after the type check above, so a non-number gives ValueError, not TypeError
            ("beta", self.beta > 0, "must be > 0"),
            ("link", isinstance(self.link, str) and self.link in LINKS, f"must be one of {sorted(LINKS)}"),
            ("mix_alpha", 0.0 <= self.mix_alpha <= 1.0, "must be in [0, 1]"),
            ("dispersion", self.dispersion > 0, "must be > 0"),
            ("sft_weight", self.sft_weight >= 0, "must be >= 0"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"objective.{name} {rule}, got {getattr(self, name)!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ObjectiveConfig:
        """A SPEC §1 preset (`dpo`, `ipo`, `hinge`, `simpo`, `mallows_dpo`, `rainbowpo`) plus overrides."""
        if name not in PRESETS:
            raise ValueError(f"objective.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"objective: unknown field(s) {unknown}; fields are {sorted(known)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> ObjectiveConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_reference(self) -> bool:
        """Reference log-probs enter z (α > 0) or entropies enter φ: a reference model must run."""
        return self.mix_alpha > 0 or self.contextual_scaling

    @property
    def needs_entropy(self) -> bool:
        return self.contextual_scaling


class PreferenceLossOutput(NamedTuple):
    losses: Tensor  # [B] loss_pair, differentiable w.r.t. the policy inputs
    chosen_rewards: Tensor  # [B] β·(ℓθ(y_w) − α·ℓref(y_w)), detached
    rejected_rewards: Tensor  # [B]
    phi: Tensor  # [B] Mallows scaling (ones when off)
    z: Tensor  # [B] detached


def _check_inputs(cfg: ObjectiveConfig, named: dict[str, Tensor | None]) -> None:
    required = {"policy_chosen", "policy_rejected", "chosen_tokens", "rejected_tokens"}
    if cfg.mix_alpha > 0:
        required |= {"ref_chosen", "ref_rejected"}
    if cfg.contextual_scaling:
        required |= {"ref_chosen_entropy", "ref_rejected_entropy"}
    for name in sorted(required):
        if named[name] is None:
            raise ValueError(
                f"preference_loss: {name} is required by this objective config ({_why(cfg, name)})"
            )
    shape = named["policy_chosen"].shape
    if len(shape) != 1:
        raise ValueError(f"preference_loss: policy_chosen must have shape [B], got {tuple(shape)}")
    for name, t in named.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"preference_loss: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _why(cfg: ObjectiveConfig, name: str) -> str:
    if "entropy" in name:
        return "objective.contextual_scaling is on"
    if name.startswith("ref"):
        return f"objective.mix_alpha = {cfg.mix_alpha} > 0"
    return "always needed"


def mallows_phi(
    cfg: ObjectiveConfig, h_chosen: Tensor, h_rejected: Tensor, n_w: Tensor, n_l: Tensor, vocab_size: int
):
    """φ = −c·ln(max(h, 1e-12)), h = ½(H_w/(n_w ln V) + H_l/(n_l ln V)) — Mallows-DPO dispersion, detached."""
    log_v = math.log(vocab_size)
    h = 0.5 * (h_chosen.detach() / (n_w * log_v) + h_rejected.detach() / (n_l * log_v))
    return -cfg.dispersion * torch.log(torch.clamp(h, min=1e-12))


def preference_loss(
    cfg: ObjectiveConfig,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    ref_chosen_entropy: Tensor | None = None,
    ref_rejected_entropy: Tensor | None = None,
    vocab_size: int | None = None,
) -> PreferenceLossOutput:
    """Per-pair RainbowPO loss (SPEC §1 steps 1–8); sequence sums in, shape [B] each."""
    _check_inputs(cfg, {k: v for k, v in locals().items() if k not in ("cfg", "vocab_size")})
    if cfg.contextual_scaling and (vocab_size is None or vocab_size < 2):
        raise ValueError(
            f"preference_loss: vocab_size (>= 2) is required by contextual_scaling, got {vocab_size}"
        )
    dtype = policy_chosen.dtype
    n_w, n_l = chosen_tokens.to(dtype), rejected_tokens.to(dtype)

    def norm(logp: Tensor, n: Tensor) -> Tensor:  # step 1
        return logp / n if cfg.length_norm else logp

    pol_w, pol_l = norm(policy_chosen, n_w), norm(policy_rejected, n_l)
    alpha = cfg.mix_alpha
    if alpha > 0:
        ref_w, ref_l = norm(ref_chosen.detach().to(dtype), n_w), norm(ref_rejected.detach().to(dtype), n_l)
    else:
        ref_w = ref_l = torch.zeros_like(pol_w).detach()
    z = (pol_w - pol_l) - alpha * (ref_w - ref_l) - (1 - alpha) * cfg.mix_gamma - cfg.margin  # steps 2–3

    if cfg.contextual_scaling:  # step 4
        h_w, h_l = ref_chosen_entropy.to(dtype), ref_rejected_entropy.to(dtype)
        phi = mallows_phi(cfg, h_w, h_l, n_w, n_l, vocab_size)
    else:
        phi = torch.ones_like(z).detach()

    u = cfg.beta * phi * z  # step 5
    losses = LINKS[cfg.link](u, cfg.label_smoothing) + cfg.sft_weight * (-pol_w)  # steps 6–7
    chosen_rewards = (cfg.beta * (pol_w - alpha * ref_w)).detach()  # step 8
    rejected_rewards = (cfg.beta * (pol_l - alpha * ref_l)).detach()
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards, phi, z.detach())
