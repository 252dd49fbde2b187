"""Attention that stays inside each packed sequence.

- `packed_sdpa` (default off-GPU): a registered transformers attention function that runs causal
  `scaled_dot_product_attention` per segment of the packed row; a segment may also see a block of
  context keys (the shared prompt of a [prompt, chosen, rejected] pair).
- `packed_mask`: the exact fallback — a 4D block-diagonal causal boolean mask with the stock sdpa.
- `flash_attention_2`: on CUDA with flash-attn installed, the varlen kernel driven by position_ids.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED_SDPA = "rainbowpo_packed_sdpa"
CHOICES = ("auto", "flash_attention_2", "sdpa", "eager", "packed_sdpa", "packed_mask")


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def select_attention(requested: str, packing: bool = True, share_prompt: bool = False) -> str:
    """The transformers attn_implementation for a request (see config `model.attn_implementation`)."""
    if requested not in CHOICES:
        raise ValueError(f"model.attn_implementation must be one of {CHOICES}, got {requested!r}")
    if not packing:
        return "sdpa" if requested in ("auto", "packed_sdpa", "packed_mask") else requested
    if requested == "auto":
        requested = "flash_attention_2" if flash_attn_available() and not share_prompt else "packed_sdpa"
    if requested == "flash_attention_2":
        if share_prompt:
            raise ValueError("data.share_prompt needs model.attn_implementation packed_sdpa or packed_mask")
        if not flash_attn_available():
            raise ValueError(
                "flash_attention_2 needs CUDA and flash-attn (pip install -r requirements-gpu.txt)"
            )
        return "flash_attention_2"
    if requested in ("sdpa", "eager"):
        raise ValueError(
            f"{requested} cannot keep packed sequences apart; use packed_sdpa or set data.packing: false"
        )
    return PACKED_SDPA if requested == "packed_sdpa" else "sdpa"  # packed_mask: stock sdpa + our 4D mask


def uses_4d_mask(attn_implementation: str, packed: bool) -> bool:
    return packed and attn_implementation in ("sdpa", "eager")


def _context_causal_mask(length: int, context: int, device) -> torch.Tensor:
    own = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(length, context, dtype=torch.bool, device=device), own], dim=1)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] → ([B, T, H, D], None), attention per segment."""
    segments = kwargs.get("rainbowpo_segments")
    if segments is None:
        raise ValueError("packed attention called without segments: pass batches made by rainbowpo collate")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    rows = []
    for r, row_segments in enumerate(segments):
        pieces, covered = [], 0
        for start, end, c0, c1 in row_segments:
            q = query[r : r + 1, :, start:end]
            k, v = key[r : r + 1, :, start:end], value[r : r + 1, :, start:end]
            if c1 > c0:  # also sees a context block (the shared prompt)
                k = torch.cat([key[r : r + 1, :, c0:c1], k], dim=2)
                v = torch.cat([value[r : r + 1, :, c0:c1], v], dim=2)
                mask = _context_causal_mask(end - start, c1 - c0, query.device)
                pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling))
            else:
                pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling))
            covered = end
        if covered < query.shape[2]:  # padding after the last segment
            pieces.append(torch.zeros_like(query[r : r + 1, :, covered:]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def block_mask_4d(segments: list[list[tuple[int, int, int, int]]], width: int, device) -> torch.Tensor:
    """[R, 1, T, T] boolean mask equal to what packed_sdpa_attention computes (True = may attend)."""
    mask = torch.zeros(len(segments), 1, width, width, dtype=torch.bool, device=device)
    for r, row_segments in enumerate(segments):
        for start, end, c0, c1 in row_segments:
            n = end - start
            mask[r, 0, start:end, start:end] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            mask[r, 0, start:end, c0:c1] = True
    idle = ~mask.any(-1, keepdim=True)  # padding rows attend to themselves (no NaN from an empty softmax)
    return mask | (idle & torch.eye(width, dtype=torch.bool, device=device))


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
