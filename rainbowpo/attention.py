"""Attention that stays inside each packed sequence (SPEC §2 "Collation").

- `packed_sdpa` (the default off-GPU, see docs/data.md for the measurement): a registered transformers
  attention function running causal `scaled_dot_product_attention` per segment of the packed row; a
  segment may also see a block of context keys (the shared prompt of a [prompt, chosen, rejected] pair).
- `packed_mask`: the exact fallback — one 4D block-diagonal causal boolean mask with the stock sdpa.
- `flash_attention_2`: on CUDA with flash-attn installed, the varlen kernel driven by position_ids.

A segment is `(start, end, context_start, context_end)` in row positions: queries `start:end` attend
causally to keys `start:end` and to all keys `context_start:context_end` (an empty range for plain
packing). Segments are python ints, so nothing here synchronizes with the device.

Our name is deliberately absent from transformers' `AttentionMaskInterface`: the model's own mask
creation then exits early (`masking_utils._preprocess_mask_arguments`) instead of building a [T, T] mask.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED_SDPA = "rainbowpo_packed_sdpa"
HALF_DTYPES = ("bf16", "fp16")
CHOICES = ("auto", "flash_attention_2", "sdpa", "eager", "packed_sdpa", "packed_mask")
Segment = tuple[int, int, int, int]  # (start, end, context_start, context_end)


def flash_attn_available() -> bool:
    """True when the varlen flash-attention path can run: a CUDA device and an importable flash_attn."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def select_attention(
    requested: str, packing: bool = True, share_prompt: bool = False, dtype: str = "bf16"
) -> str:
    """The transformers `attn_implementation` for a request (config `model.attn_implementation`).

    `auto` → flash_attention_2 for plain packing when CUDA + flash-attn are present, per-segment sdpa
    for other packing, stock sdpa for padded batches. `packed_mask` maps to stock sdpa (the scorer then
    passes a 4D mask). `dtype` is model.dtype: flash-attn has no fp32 kernel, so `auto` never picks it for
    fp32. Requests that cannot keep packed sequences apart raise ValueError.
    """
    if requested not in CHOICES:
        raise ValueError(f"model.attn_implementation must be one of {CHOICES}, got {requested!r}")
    if not packing:
        return "sdpa" if requested in ("auto", "packed_sdpa", "packed_mask") else requested
    if requested == "auto":
        flash = flash_attn_available() and not share_prompt and dtype in HALF_DTYPES
        requested = "flash_attention_2" if flash else "packed_sdpa"
    if requested == "flash_attention_2":
        if dtype not in HALF_DTYPES:
            raise ValueError(f"flash_attention_2 runs in bf16 or fp16 only; model.dtype is {dtype}")
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
    """Whether a packed batch must carry an explicit 4D mask for this implementation."""
    return packed and attn_implementation in ("sdpa", "eager")


def segment_mask(length: int, context: int, window: int | None, device) -> torch.Tensor:
    """[length, context + length] bool (True = may attend) for one segment and its context block.

    Query k sits at position context + k (for a plain segment context = 0; for the rejected block of a
    shared prompt its positions continue from the prompt end), so one causal/sliding rule covers both.
    """
    q = torch.arange(context, context + length, device=device)[:, None]
    k = torch.arange(context + length, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed &= k > q - window  # transformers' sliding_window_overlay: the last `window` keys
    return allowed


def _check_supported(kwargs: dict) -> None:
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"packed_sdpa does not support attention {name}; use model.attn_implementation "
                "flash_attention_2 or data.packing: false for this model"
            )


def _split_at(x: torch.Tensor, cuts: list[int]) -> dict[int, torch.Tensor]:
    """Pieces of x [1, H, T, D] along T between consecutive cuts, keyed by their start.

    One `split` instead of many slices: the backward of a slice writes a full-size zero tensor, so
    slicing every segment out of a long row costs O(segments x T) in backward; a split costs O(T).
    """
    pieces = x.split([b - a for a, b in zip(cuts, cuts[1:])], dim=2)
    return dict(zip(cuts, pieces))


def _span(pieces: dict[int, torch.Tensor], cuts: list[int], a: int, b: int) -> torch.Tensor:
    parts = [pieces[c] for c in cuts[cuts.index(a) : cuts.index(b)]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _attend_row(q, k, v, segments: list[Segment], dropout: float, scaling, window, gqa: bool) -> torch.Tensor:
    """One packed row: q [1, H, T, D], k/v [1, Hkv, T, D] → [1, H, T, D].

    Kept 4D: with 3D inputs torch's CPU sdpa falls back to its math kernel (~30 % slower fwd + bwd).
    """
    width = q.shape[2]
    cuts = sorted({0, width, *(x for seg in segments for x in seg)})
    qs, ks, vs = _split_at(q, cuts), _split_at(k, cuts), _split_at(v, cuts)
    out, covered = [], 0
    for start, end, c0, c1 in segments:
        n, ctx = end - start, c1 - c0
        keys, values = _span(ks, cuts, start, end), _span(vs, cuts, start, end)
        if ctx > 0:  # also sees a context block (the shared prompt)
            keys = torch.cat([_span(ks, cuts, c0, c1), keys], dim=2)
            values = torch.cat([_span(vs, cuts, c0, c1), values], dim=2)
        mask = segment_mask(n, ctx, window, q.device) if ctx > 0 or (window and n > window) else None
        out.append(
            F.scaled_dot_product_attention(
                _span(qs, cuts, start, end),
                keys,
                values,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=gqa,
            )  # fmt: skip
        )
        covered = end
    if covered < width:  # padding after the last segment
        out.append(q.new_zeros(*q.shape[:2], width - covered, q.shape[3]))
    return torch.cat(out, dim=2)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [R, H, T, D], key/value [R, Hkv, T, D] → ([R, T, H, D], None), attention per segment.

    Needs `rainbowpo_segments` (Batch.segments, segments in increasing order) in kwargs; the model
    forwards it to every layer.
    """
    segments = kwargs.get("rainbowpo_segments")
    if segments is None:
        raise ValueError("packed attention called without segments: pass batches made by rainbowpo collate")
    _check_supported(kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = [
        _attend_row(q, k, v, row_segments, dropout, scaling, sliding_window, gqa)
        for q, k, v, row_segments in zip(query.split(1), key.split(1), value.split(1), segments)
    ]
    out = rows[0] if len(rows) == 1 else torch.cat(rows)
    return out.transpose(1, 2).contiguous(), None


def block_mask_4d(
    segments: list[list[Segment]], width: int, device, sliding_window: int | None = None
) -> torch.Tensor:
    """[R, 1, T, T] boolean mask equal to what packed_sdpa_attention computes (True = may attend)."""
    mask = torch.zeros(len(segments), 1, width, width, dtype=torch.bool, device=device)
    for r, row_segments in enumerate(segments):
        for start, end, c0, c1 in row_segments:
            allowed = segment_mask(end - start, c1 - c0, sliding_window, device)
            mask[r, 0, start:end, c0:c1] = allowed[:, : c1 - c0]
            mask[r, 0, start:end, start:end] = allowed[:, c1 - c0 :]
    idle = ~mask.any(-1, keepdim=True)  # padding rows attend to themselves (no NaN from an empty softmax)
    return mask | (idle & torch.eye(width, dtype=torch.bool, device=device))


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
