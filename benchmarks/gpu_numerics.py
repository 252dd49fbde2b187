"""The numerics checks of benchmarks/gpu_check.py (random-init Llama-shaped models, no downloads).

    packed_vs_padded(shape, device, dtype)   # packed (flash-attn varlen on CUDA) vs padded log-probs + loss
    chunked_head_grads(shape, device)        # keep_logits_mb 0 (chunked recompute) vs kept logits: gradients

Each returns a row: {"check", "value", "tolerance", "ok", "detail"}. Tolerances (docs/benchmarks.md):
- packed vs padded in bf16: both paths round differently, so the bound is the rounding noise itself —
  packing passes when |packed − padded| ≤ 2 × the larger of each path's distance to an fp32 padded run of the
  same weights (and never above 2 % relative); in fp32 the bound is 1e-5 relative.
- chunked vs kept head, fp32 with TF32 off: the same products summed in another order, 1e-5 relative.
"""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rainbowpo.attention import select_attention
from rainbowpo.data.collate import collate
from rainbowpo.data.tokenize import PairExample
from rainbowpo.logprobs import SequenceScorer
from rainbowpo.objective import ObjectiveConfig, preference_loss

FP32_TOLERANCE = 1e-5
BF16_CAP = 2e-2


def llama(shape: dict, dtype: torch.dtype, attn: str, device) -> torch.nn.Module:
    """A random-init Llama-shaped model; `shape` holds hidden, layers, heads, kv_heads, ffn, vocab."""
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=8192,
        tie_word_embeddings=shape.get("tied", False),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def random_pairs(n: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)

    def ids(lo_hi: tuple[int, int]) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(*lo_hi))]

    return [PairExample(i, ids(prompt), ids(response), ids(response)) for i in range(n)]


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(|b|, 1) elementwise (log-prob sums are O(100), losses O(1))."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


@torch.no_grad()
def _logps_and_loss(model, examples: list, packing: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate(examples, packing=packing, pad_id=0).to(device)
    logp, _ = SequenceScorer(model)(batch)
    n = batch.seq_tokens.to(logp.dtype)
    out = preference_loss(ObjectiveConfig.from_preset("simpo"), logp[0::2], logp[1::2], n[0::2], n[1::2])
    return logp.float(), out.losses.float()


def packed_vs_padded(shape: dict, device, dtype: torch.dtype, pairs: int = 8) -> dict:
    """Packed attention (flash-attn varlen where CUDA + flash-attn, else per-segment sdpa) vs padded sdpa."""
    packed_attn = select_attention("auto", True, False, "fp32" if dtype == torch.float32 else "bf16")
    packed = llama(shape, dtype, packed_attn, device).eval()
    padded = llama(shape, dtype, "sdpa", device).eval()
    padded.load_state_dict(packed.state_dict())
    examples = random_pairs(pairs, shape["vocab"], shape["prompt"], shape["response"])
    lp_packed, loss_packed = _logps_and_loss(packed, examples, True, device)
    lp_padded, loss_padded = _logps_and_loss(padded, examples, False, device)
    diff = max(relative_diff(lp_packed, lp_padded), relative_diff(loss_packed, loss_padded))
    if dtype == torch.float32:
        tolerance, noise = FP32_TOLERANCE, 0.0
    else:  # the same weights in fp32: how far bf16 rounding alone moves each path
        exact = llama(shape, torch.float32, "sdpa", device).eval()
        exact.load_state_dict({k: v.float() for k, v in packed.state_dict().items()})
        lp_exact, loss_exact = _logps_and_loss(exact, examples, False, device)
        noise = max(relative_diff(x, y) for x, y in [(lp_packed, lp_exact), (lp_padded, lp_exact),
                                                      (loss_packed, loss_exact), (loss_padded, loss_exact)])  # fmt: skip
        tolerance = min(BF16_CAP, max(2 * noise, FP32_TOLERANCE))
    return {
        "check": f"packed ({packed_attn}) vs padded log-probs + loss, {str(dtype)[6:]}",
        "value": diff,
        "tolerance": tolerance,
        "ok": diff <= tolerance,
        "detail": f"{pairs} pairs; bf16 rounding vs fp32 {noise:.2e}" if noise else f"{pairs} pairs",
    }


def chunked_head_grads(shape: dict, device, pairs: int = 4) -> dict:
    """Gradients with the LM head chunked and recomputed (keep_logits_mb 0) vs kept logits, fp32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = llama(shape, torch.float32, "sdpa", device)
        examples = random_pairs(pairs, shape["vocab"], shape["prompt"], shape["response"], seed=1)
        batch = collate(examples, packing=False, pad_id=0).to(device)
        grads = []
        for keep_mb in (0.0, 1e12):
            model.zero_grad(set_to_none=True)
            logp, _ = SequenceScorer(model, chunk_size=shape.get("chunk", 1024), keep_logits_mb=keep_mb)(
                batch
            )
            (-logp.sum()).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    diff = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
    tokens = int(batch.target_ids.numel())
    return {
        "check": f"chunked LM-head recompute vs kept logits, gradients (vocab {shape['vocab']})",
        "value": diff,
        "tolerance": FP32_TOLERANCE,
        "ok": diff <= FP32_TOLERANCE,
        "detail": f"{tokens} response tokens, chunk {shape.get('chunk', 1024)}, max |Δg| / max |g|",
    }
