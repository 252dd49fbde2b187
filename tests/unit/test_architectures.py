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
    with torch.no_grad():
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


@pytest.mark.parametrize("arch", ["llama", "cohere", "granite", "gemma2"])
def test_training_gradients_equal_the_models_own(arch):
    """The path training takes (grad on, logits kept: HeadLogProb where it applies, autograd for Gemma-2's
    soft-cap) against autograd through the model's own logits, every parameter, unequal per-sequence weights."""
    exs = examples()
    oracle, model = (
        tiny(arch),
        tiny(arch, select_attention("sdpa" if arch != "gemma2" else "eager", False, False)),
    )
    weights = torch.linspace(0.5, 2.0, 2 * len(exs))
    (own_logps(oracle, exs) * weights).sum().backward()
    batch = collate(exs, packing=False, share_prompt=False, pad_id=0)
    scorer = SequenceScorer(model)
    head = model.get_output_embeddings()
    assert logprobs.fused_head_applies(head, logit_transform(model.config)) == (arch != "gemma2")
    (scorer(batch)[0] * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=f"{arch} {name}")


def test_head_log_prob_by_hand():
    """Two positions, vocab 3, hidden 1, W = [1, 2, 3]ᵀ, b = [0, 0, 1], scale 1/2: z = (h·W + b)/2.
    h = 2: z = (1, 2, 3.5), target 2 → log p = 3.5 − log(e + e² + e^3.5).
    Gradient of g·log p for g = 3: ∂z = g·(onehot − p); ∂h = ½ ∂z·W, ∂W = ½ ∂z·h, ∂b = ½ ∂z."""
    W = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
    b = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    h = torch.tensor([[2.0]], requires_grad=True)
    logp = logprobs.HeadLogProb.apply(h, W, b, torch.tensor([2]), 0.5)
    z = torch.tensor([1.0, 2.0, 3.5], dtype=torch.float64)
    expected = 3.5 - torch.logsumexp(z, 0)
    assert abs(float(logp.detach()) - float(expected)) < 1e-6
    (3.0 * logp).sum().backward()
    p = torch.softmax(z, 0)
    dz = 3.0 * (torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - p)
    torch.testing.assert_close(
        h.grad.double(), (0.5 * dz @ W.detach().double()).reshape(1, 1), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(W.grad.double(), 0.5 * dz[:, None] * 2.0, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.grad.double(), 0.5 * dz, atol=1e-6, rtol=0)


def test_head_log_prob_refuses_a_second_backward():
    h = torch.randn(4, 8, requires_grad=True)
    logp = logprobs.HeadLogProb.apply(h, torch.randn(16, 8), None, torch.tensor([1, 2, 3, 4]), 1.0)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_check_head_stops_when_the_fused_gradient_is_wrong(monkeypatch):
    model = tiny("llama", "sdpa")
    batch = collate(examples(), packing=False, share_prompt=False, pad_id=0)
    backward = logprobs.HeadLogProb.backward
    monkeypatch.setattr(logprobs.HeadLogProb, "backward", staticmethod(lambda ctx, g: backward(ctx, 2 * g)))
    with pytest.raises(ValueError, match="fused LM-head gradient"):
        check_head(SequenceScorer(model), batch)


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
