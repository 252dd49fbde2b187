"""LoRA pieces without DeepSpeed: config, target scan, the reference switch, the manual merge, QLoRA's error.

Expectations are computed independently: the merge against W + (alpha/r)·B·A written out and against peft's
own merge_and_unload; the adapter-off reference against the untouched base model's logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rainbowpo import lora, lora_fused
from rainbowpo.config import ConfigError, load_config

BASE = ["model.path=/m", "data.train=p.jsonl"]
LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def cfg_with(*overrides: str):
    return load_config(None, BASE + list(overrides))


def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def randomize_adapter(peft_model, seed: int = 3) -> None:
    """LoRA starts with B = 0 (a no-op); give every A and B random values so the adapter does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name and f".{lora.TRAINED}." in name:  # never the frozen reference copy
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ----------------------------------------------------------------------------- config


def test_lora_is_off_by_default_and_on_with_a_rank_or_an_adapter():
    assert not cfg_with().model.uses_lora()
    assert cfg_with("model.lora.r=8").model.uses_lora()
    assert cfg_with("model.adapter_path=/a").model.uses_lora()
    cfg = cfg_with("model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj]", "model.lora.alpha=32")
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"] and cfg.model.lora.alpha == 32.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.r=-1"], "model.lora.r"),
        (["model.lora.r=8", "model.lora.dropout=1.5"], "model.lora.dropout"),
        (["model.load_in_4bit=true"], "model.lora.r"),  # 4-bit without an adapter trains nothing
        (["model.lora.r=8", "reference.path=/ref"], "reference.path"),
        (["model.lora.rank=8"], "unknown key model.lora.rank"),
    ],
)
def test_lora_config_mistakes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        cfg_with(*overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_4bit_on_cpu_is_one_config_error_before_anything_loads(tmp_path):
    from rainbowpo import train

    cfg = cfg_with("model.lora.r=8", "model.load_in_4bit=true", "deepspeed.config=zero2",
                   f"model.path={tmp_path / 'missing-model'}", f"output.dir={tmp_path / 'out'}")  # fmt: skip
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as err:
        train.setup(cfg)  # the model folder does not exist: a load attempt would fail differently
    assert "model.load_in_4bit" in str(err.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- wrapping and reference


def test_default_targets_are_every_attention_and_mlp_linear_not_the_head():
    assert lora.default_target_modules(tiny_llama()) == LLAMA_LINEARS


def test_only_adapter_parameters_are_trainable():
    peft_model = lora.wrap(tiny_llama(), cfg_with("model.lora.r=4"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(LLAMA_LINEARS) * 2  # A and B, 7 layers, 2 blocks


def test_adapter_off_reference_is_the_base_model():
    base = tiny_llama()
    expected = base(ids()).logits
    peft_model = lora.wrap(copy.deepcopy(base), cfg_with("model.lora.r=4"))
    assert torch.equal(peft_model(ids()).logits, expected)  # B = 0 at start: exactly the base
    randomize_adapter(peft_model)
    assert not torch.allclose(peft_model(ids()).logits, expected, atol=1e-3)
    with lora.reference_weights(peft_model):
        assert torch.equal(peft_model(ids()).logits, expected)
    assert not torch.allclose(peft_model(ids()).logits, expected, atol=1e-3)  # adapter back on


def test_starting_adapter_reference_is_frozen_copy(tmp_path):
    trained = lora.wrap(tiny_llama(), cfg_with("model.lora.r=4"))
    randomize_adapter(trained)
    start = trained(ids()).logits
    trained.save_pretrained(tmp_path / "adapter")
    policy = lora.wrap(tiny_llama(), cfg_with(f"model.adapter_path={tmp_path / 'adapter'}"))
    with lora.reference_weights(policy):
        assert torch.allclose(policy(ids()).logits, start, atol=1e-6)
    assert torch.allclose(policy(ids()).logits, start, atol=1e-6)  # the policy at step 0 = the reference
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(f".{lora.TRAINED}." in n for n in trainable)
    randomize_adapter(policy, seed=9)  # "training" the adapter must leave the reference copy alone
    assert not torch.allclose(policy(ids()).logits, start, atol=1e-3)
    with lora.reference_weights(policy):
        assert torch.allclose(policy(ids()).logits, start, atol=1e-6)
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable


def test_missing_adapter_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json"):
        lora.wrap(tiny_llama(), cfg_with(f"model.adapter_path={tmp_path}"))


# ----------------------------------------------------------------------------- merge


def test_manual_merge_is_w_plus_scaled_ba_and_matches_peft():
    r, alpha = 4, 8.0
    peft_model = lora.wrap(tiny_llama(), cfg_with(f"model.lora.r={r}", f"model.lora.alpha={alpha}"))
    randomize_adapter(peft_model)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = lora.merged_state_dict(peft_model, state)

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    w, a, b = (state[f"{prefix}.{s}.weight"] for s in ("base_layer", "lora_A.default", "lora_B.default"))
    assert torch.allclose(
        merged["model.layers.0.self_attn.q_proj.weight"], w + (alpha / r) * b @ a, atol=1e-6
    )
    assert torch.equal(merged["lm_head.weight"], state["base_model.model.lm_head.weight"])

    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key in reference:
        assert torch.allclose(merged[key], reference[key], atol=1e-6), key
    fresh = tiny_llama(seed=5)
    fresh.load_state_dict(merged)
    assert torch.allclose(fresh(ids()).logits, peft_model(ids()).logits, atol=1e-5)


def test_resolve_model_folder_merges_an_adapter_once(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    _tokenizer(tmp_path / "base")
    peft_model = lora.wrap(copy.deepcopy(base), cfg_with("model.lora.r=4"))
    randomize_adapter(peft_model)
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    assert lora.resolve_model_folder(str(tmp_path / "base")) == str(tmp_path / "base")
    merged_dir = lora.resolve_model_folder(str(tmp_path / "adapter"), cache_root=str(tmp_path / "cache"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert torch.allclose(merged(ids()).logits, peft_model(ids()).logits, atol=1e-5)
    again = lora.resolve_model_folder(str(tmp_path / "adapter"), cache_root=str(tmp_path / "cache"))
    assert again == merged_dir and len(list((tmp_path / "cache").iterdir())) == 1


def _tokenizer(folder):
    from rainbowpo.tiny import train_bpe

    train_bpe(["alpha beta gamma"] * 20, str(folder), vocab_size=300)


# ----------------------------------------------------------------------------- fused LoRA linear


def test_lora_linear_matches_the_formula_by_hand():
    """x = [1, 2], W = I, b = [0.5, 0], A = [1, 1] (r 1), B = [[2], [0]], s = 0.5:
    y = x + b + 0.5·(x·Aᵀ)·Bᵀ = [1, 2] + [0.5, 0] + 0.5·3·[2, 0] = [4.5, 2].
    With G = [1, 1]: ∂x = G + 0.5·(G·B)·A = [1, 1] + 0.5·2·[1, 1] = [2, 2]; ∂B = 0.5·Gᵀ·3 = [[1.5], [1.5]];
    ∂A = 0.5·(G·B)·x = 0.5·2·[1, 2] = [1, 2]."""
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    a = torch.tensor([[1.0, 1.0]], requires_grad=True)
    b = torch.tensor([[2.0], [0.0]], requires_grad=True)
    y = lora_fused.LoraLinear.apply(x, torch.eye(2), torch.tensor([0.5, 0.0]), a, b, 0.5)
    assert y.tolist() == [[4.5, 2.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[2.0, 2.0]]
    assert b.grad.tolist() == [[1.5], [1.5]]
    assert a.grad.tolist() == [[1.0, 2.0]]


def test_fused_model_equals_peft_forward_and_gradients():
    """A whole tiny Llama: logits and every adapter gradient equal peft's own forward (fp32, 1e-5)."""
    peft_model = lora.wrap(tiny_llama(), cfg_with("model.lora.r=4"))
    randomize_adapter(peft_model)
    fused = copy.deepcopy(peft_model)
    assert lora_fused.fuse(fused) == 2 * len(LLAMA_LINEARS)
    fused = copy.deepcopy(fused)  # the copy's layers call their own weights, not the original's
    layer = fused.base_model.model.model.layers[0].mlp.down_proj
    assert layer.forward.__self__ is layer and layer._peft_forward.__self__ is layer
    results = []
    for model in (peft_model, fused):
        logits = model(ids()).logits
        (logits * torch.linspace(0.5, 1.5, logits.shape[-1])).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits, grads))
    (slow, slow_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert slow_grads.keys() == fast_grads.keys()
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-5, atol=1e-5)
    with lora.reference_weights(fused):  # adapter off: peft's own path, exactly the base
        assert torch.equal(fused(ids()).logits, tiny_llama()(ids()).logits)


def test_fused_path_is_used_only_for_plain_lora():
    peft_model = lora.wrap(tiny_llama(), cfg_with("model.lora.r=4", "model.lora.dropout=0.1"))
    lora_fused.fuse(peft_model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, 16)
    assert lora_fused._operands(layer, x) is None  # dropout: peft's path
    plain = lora.wrap(tiny_llama(), cfg_with("model.lora.r=4"))
    lora_fused.fuse(plain)
    layer = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_fused._operands(layer, x) is not None
    assert lora_fused._operands(layer, x.double()) is None  # peft would cast the input
    with plain.disable_adapter():
        assert lora_fused._operands(layer, x) is None


def test_check_compares_with_peft_and_catches_a_wrong_gradient(monkeypatch):
    peft_model = lora.wrap(tiny_llama(), cfg_with("model.lora.r=4"))
    lora_fused.fuse(peft_model)
    b_before = {n: p.clone() for n, p in peft_model.named_parameters() if ".lora_B." in n}
    rng_before = torch.get_rng_state()
    assert lora_fused.check(peft_model) < 1e-5
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global random stream is not consumed
    assert all(torch.equal(p, b_before[n]) for n, p in peft_model.named_parameters() if n in b_before)
    backward = lora_fused.LoraLinear.backward

    def wrong(ctx, grad):
        grad_x, w, b, grad_a, grad_b, s = backward(ctx, grad)
        return grad_x, w, b, grad_a, grad_b * 2, s

    monkeypatch.setattr(lora_fused.LoraLinear, "backward", staticmethod(wrong))
    with pytest.raises(ValueError, match="model.lora.fused: false"):
        lora_fused.check(peft_model)
