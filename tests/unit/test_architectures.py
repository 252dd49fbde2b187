"""Every architecture's log-probs equal the model's own: the fast LM-head path (body → selected positions →
head → logit_transform) against each sequence alone through `model(...).logits` + log_softmax, on tiny
random configs built here. The transforms are made large (Gemma-2 soft-cap 0.5, Cohere scale 0.25, Granite
÷4) so that leaving one out would fail the comparison; `check_head` is shown to catch exactly that.
Also: MoE router auxiliary loss equals the model's own `aux_loss`."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rainbowpo import logprobs
from rainbowpo.attention import select_attention
from rainbowpo.data.collate import collate
from rainbowpo.data.tokenize import PairExample
from rainbowpo.logprobs import SequenceScorer, check_head, logit_transform, router_aux_coef

BASE = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
ARCHS = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": 4},  # shorter than the sequences: the window matters
    "gemma2": {"final_logit_softcapping": 0.5, "head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8},
    "cohere": {"logit_scale": 0.25},
    "granite": {"logits_scaling": 4.0},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
}  # fmt: skip
TRANSFORMED = ("gemma2", "cohere", "granite")


def tiny(arch: str, attn: str = "eager"):
    cfg = AutoConfig.for_model(arch, **{**BASE, **ARCHS[arch]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def examples(n=3, seed=0):
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randint(3, 49) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [PairExample(i, ids(3, 7), ids(2, 6), ids(2, 6)) for i in range(n)]


@torch.no_grad()
def own_logps(model, exs):
    """Each sequence alone through the model's own forward (its logits, transforms included)."""
    out = []
    for ex in exs:
        for resp in (ex.chosen_ids, ex.rejected_ids):
            lp = model(torch.tensor([ex.prompt_ids + resp])).logits[0].float().log_softmax(-1)
            p = len(ex.prompt_ids)
            out.append(lp[torch.arange(p - 1, p - 1 + len(resp)), torch.tensor(resp)].sum())
    return torch.stack(out)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fast_path_equals_the_models_own_logits(arch):
    exs = examples()
    expected = own_logps(tiny(arch), exs)
    # Gemma-2 soft-caps attention scores too: eager only (no sdpa in transformers, so no packing here)
    layouts = [("eager", False)] if arch == "gemma2" else [("sdpa", False), ("packed_sdpa", True)]
    for req, packing in layouts:
        model = tiny(arch, select_attention(req, packing, False))
        batch = collate(exs, packing=packing, share_prompt=False, pad_id=0)
        with torch.no_grad():
            lp, _ = SequenceScorer(model, chunk_size=3, keep_logits_mb=0)(batch)
        torch.testing.assert_close(lp, expected, atol=2e-5, rtol=0, msg=f"{arch} {req}")
        assert check_head(SequenceScorer(model), batch) < 1e-4


@pytest.mark.parametrize("arch", TRANSFORMED)
def test_check_head_stops_when_a_transform_is_missing(arch, monkeypatch):
    model = tiny(arch, "eager")
    batch = collate(examples(), packing=False, share_prompt=False, pad_id=0)
    assert logit_transform(model.config) != (1.0, None)
    monkeypatch.setattr(logprobs, "logit_transform", lambda config: (1.0, None))
    with pytest.raises(ValueError, match=f"differ from {type(model).__name__}'s own logits"):
        check_head(SequenceScorer(model), batch)


def test_transform_values_by_hand():
    assert logit_transform(tiny("cohere").config) == (0.25, None)
    assert logit_transform(tiny("granite").config) == (0.25, None)
    assert logit_transform(tiny("gemma2").config) == (1.0, 0.5)
    assert logit_transform(tiny("llama").config) == (1.0, None)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_router_aux_loss_is_the_models_own(arch):
    model = tiny(arch, "sdpa")
    assert router_aux_coef(model, None) == model.config.router_aux_loss_coef > 0
    assert router_aux_coef(model, 0.5) == 0.5 and router_aux_coef(tiny("llama"), 0.5) == 0.0
    exs = examples()
    batch = collate(exs, packing=False, share_prompt=False, pad_id=0)
    scorer = SequenceScorer(model, aux_coef=router_aux_coef(model, None))
    scorer(batch)  # grad enabled: the router loss is computed
    own = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    torch.testing.assert_close(scorer.aux_loss, own.aux_loss, atol=1e-6, rtol=0)
    assert scorer.aux_loss.requires_grad
