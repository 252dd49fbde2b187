"""LoRA pieces without DeepSpeed: config, target scan, the reference switch, the manual merge, QLoRA's error.

Expectations are computed independently: the merge against W + (alpha/r)·B·A written out and against peft's
own merge_and_unload; the adapter-off reference against the untouched base model's logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rainbowpo import lora
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
