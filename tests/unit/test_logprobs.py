"""Packed == padded == shared-prompt == 4D-mask == a naive full-logits oracle (values and gradients),
on a tiny Llama and a tiny Qwen2; packed sequences are isolated; exact collation indices."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rainbowpo import attention
from rainbowpo.attention import select_attention
from rainbowpo.data.collate import collate
from rainbowpo.data.tokenize import PairExample, SFTExample
from rainbowpo.logprobs import SequenceScorer, vocab_size

LAYOUTS = {  # name: (attn request, packing, share_prompt)
    "padded": ("sdpa", False, False),
    "packed": ("packed_sdpa", True, False),
    "shared": ("packed_sdpa", True, True),
    "mask": ("packed_mask", True, False),
    "mask_shared": ("packed_mask", True, True),
}


def examples(n=3, seed=0):
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randint(3, 49) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [PairExample(i, ids(2, 7), ids(1, 6), ids(1, 6)) for i in range(n)]


def tiny(arch: str, attn: str):
    cfg = AutoConfig.for_model(arch, vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def naive_logps(model, exs):
    """Each sequence alone through the full model; log-softmax over all logits."""
    out, ent = [], []
    for ex in exs:
        for resp in (ex.chosen_ids, ex.rejected_ids):
            logits = model(torch.tensor([ex.prompt_ids + resp])).logits[0].float()
            lp = logits.log_softmax(-1)
            p = len(ex.prompt_ids)
            rows = torch.arange(p - 1, p - 1 + len(resp))
            out.append(lp[rows, torch.tensor(resp)].sum())
            ent.append(-(lp[rows].exp() * lp[rows]).sum())
    return torch.stack(out), torch.stack(ent)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_all_layouts_match_naive_values_and_gradients(arch):
    exs = examples()
    oracle = tiny(arch, "eager")
    ref_lp, ref_ent = naive_logps(oracle, exs)
    ref_lp.sum().backward()
    ref_grad = {n: p.grad.clone() for n, p in oracle.named_parameters()}
    for name, (req, packing, share) in LAYOUTS.items():
        model = tiny(arch, select_attention(req, packing, share))
        batch = collate(exs, packing=packing, share_prompt=share, pad_id=0)
        lp, ent = SequenceScorer(model, chunk_size=3, keep_logits_mb=0)(batch, with_entropy=True)
        torch.testing.assert_close(lp, ref_lp.detach(), atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=0, msg=name)
        lp.sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grad[n], atol=1e-5, rtol=1e-4, msg=f"{name} {n}")


def test_chunking_and_recompute_do_not_change_values_or_gradients():
    exs = examples(4, seed=3)
    batch = collate(exs, packing=True, pad_id=0)
    results = []
    for chunk, keep_mb in ((1, 0), (5, 0), (4096, 0), (5, 512)):  # keep 0: chunks recomputed in backward
        model = tiny("llama", select_attention("packed_sdpa"))
        lp, _ = SequenceScorer(model, chunk_size=chunk, keep_logits_mb=keep_mb)(batch)
        lp.sum().backward()
        results.append((lp.detach(), model.lm_head.weight.grad.clone()))
    for lp, grad in results[1:]:
        # keep 512 takes HeadLogProb (logp = z_t − max − log Σ e^(z−max)), not log_softmax: fp32 rounding
        torch.testing.assert_close(lp, results[0][0], atol=1e-6, rtol=2e-7)
        # the LM-head gradient sums over chunks in a different order: fp32 rounding, relative 1e-6
        torch.testing.assert_close(grad, results[0][1], atol=1e-6, rtol=1e-6)


def test_packed_sequences_are_isolated():
    exs = examples(3, seed=5)
    model = tiny("llama", select_attention("packed_sdpa"))
    scorer = SequenceScorer(model)
    with torch.no_grad():
        before, _ = scorer(collate(exs, packing=True, pad_id=0))
        changed = [exs[0], PairExample(1, [7] * 9, [8, 9], [10]), exs[2]]
        after, _ = scorer(collate(changed, packing=True, pad_id=0))
    keep = [0, 1, 4, 5]  # sequences of pairs 0 and 2
    torch.testing.assert_close(after[keep], before[keep], atol=1e-6, rtol=0)
    assert not torch.allclose(after[2:4], before[2:4])


def test_collation_indices_by_hand():
    ex = PairExample(7, [1, 2], [3, 4], [5])
    padded = collate([ex], packing=False, pad_id=0, pad_to_multiple_of=8)
    assert padded.input_ids.tolist() == [[1, 2, 3, 4, 0, 0, 0, 0], [1, 2, 5, 0, 0, 0, 0, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    # hidden state at position 1 predicts token 3, position 2 predicts 4; row 1 starts at flat index 8
    assert padded.target_index.tolist() == [1, 2, 9]
    assert padded.target_ids.tolist() == [3, 4, 5] and padded.target_seq.tolist() == [0, 0, 1]
    assert padded.seq_tokens.tolist() == [2, 1] and padded.num_tokens == 7 and padded.row_ids.tolist() == [7]

    packed = collate([ex], packing=True, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 1, 2, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert packed.target_index.tolist() == [1, 2, 5] and packed.segments == [[(0, 4, 0, 0), (4, 7, 4, 4)]]

    shared = collate([ex], packing=True, share_prompt=True, pad_id=0)
    assert shared.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # rejected continues from the prompt end
    assert shared.target_index.tolist() == [1, 2, 1]  # the last prompt token predicts both first tokens
    assert shared.segments == [[(0, 4, 0, 0), (4, 5, 0, 2)]] and shared.num_tokens == 5

    sft = collate([SFTExample(0, [1, 2], [3, 4]), SFTExample(1, [5], [6])], packing=True, pad_id=0)
    assert sft.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]] and sft.target_seq.tolist() == [0, 0, 1]
    assert sft.seq_tokens.tolist() == [2, 1]


def test_select_attention(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert select_attention("auto") == attention.PACKED_SDPA
    assert select_attention("auto", packing=False) == "sdpa"
    assert select_attention("packed_mask") == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        select_attention("flash_attention_2")
    with pytest.raises(ValueError, match="packed"):
        select_attention("sdpa", packing=True)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert select_attention("auto") == "flash_attention_2"
    assert select_attention("auto", share_prompt=True) == attention.PACKED_SDPA
    with pytest.raises(ValueError, match="share_prompt"):
        select_attention("flash_attention_2", share_prompt=True)
    # flash-attn has no fp32 kernel: auto falls back to per-segment sdpa, an explicit request is an error
    assert select_attention("auto", dtype="fp32") == attention.PACKED_SDPA
    assert select_attention("auto", dtype="fp16") == "flash_attention_2"
    with pytest.raises(ValueError, match="bf16 or fp16"):
        select_attention("flash_attention_2", dtype="fp32")


def test_vocab_size_is_head_output_dim():
    model = tiny("llama", "sdpa")
    assert vocab_size(model) == 50
