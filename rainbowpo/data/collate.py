"""Examples → one model batch, padded or packed, with the indices the log-prob pass needs.

Sequence order: pair i gives sequence 2i (chosen) and 2i+1 (rejected); SFT example i gives sequence i.
Packed: every sequence in one row, position_ids restarting at 0, and `segments` telling the attention
which keys each block of queries may see. With `share_prompt`, a pair is packed as
[prompt, chosen, rejected]: the rejected block sees the prompt and itself (positions continue from the
prompt's end), never the chosen response — the prompt is computed once per pair.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rainbowpo.data.tokenize import PairExample, SFTExample

Segment = tuple[int, int, int, int]  # (start, end, context_start, context_end) in row positions


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor | None  # [R, T] for padded rows; None when packed
    segments: list[list[Segment]] | None  # per packed row: query blocks and the extra context they see
    target_index: torch.Tensor  # [N] flat index into R*T of the hidden state predicting each response token
    target_ids: torch.Tensor  # [N]
    target_seq: torch.Tensor  # [N] sequence id of each response token
    seq_tokens: torch.Tensor  # [S] response tokens per sequence (EOS included)
    row_ids: torch.Tensor  # [examples]
    num_seqs: int
    num_tokens: int  # non-pad tokens run through the model

    def to(self, device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)


def _sequences(ex) -> list[tuple[list[int], list[int]]]:
    if isinstance(ex, PairExample):
        return [(ex.prompt_ids, ex.chosen_ids), (ex.prompt_ids, ex.rejected_ids)]
    if isinstance(ex, SFTExample):
        return [(ex.prompt_ids, ex.completion_ids)]
    raise TypeError(f"collate: expected PairExample or SFTExample, got {type(ex).__name__}")


def collate(
    examples: list,
    *,
    packing: bool,
    share_prompt: bool = False,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> Batch:
    if not examples:
        raise ValueError("collate: empty micro-batch")
    if share_prompt and not (packing and isinstance(examples[0], PairExample)):
        raise ValueError("collate: share_prompt needs packing and preference pairs")
    rows = _pack_shared(examples) if share_prompt else _pack(examples) if packing else _pad(examples)
    return _to_batch(rows, examples, pad_id, pad_to_multiple_of, packed=packing)


class _Row:
    def __init__(self):
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.segments: list[Segment] = []
        self.targets: list[tuple[int, int, int]] = []  # (position, token, seq)

    def add_sequence(self, prompt: list[int], response: list[int], seq: int) -> int:
        start = len(self.ids)
        self.ids += prompt + response
        self.pos += list(range(len(prompt) + len(response)))
        self.segments.append((start, len(self.ids), start, start))
        p = start + len(prompt)
        self.targets += [(p - 1 + k, tok, seq) for k, tok in enumerate(response)]
        return start


def _pad(examples: list) -> list[_Row]:
    rows = []
    for seq, (prompt, response) in enumerate(s for ex in examples for s in _sequences(ex)):
        row = _Row()
        row.add_sequence(prompt, response, seq)
        rows.append(row)
    return rows


def _pack(examples: list) -> list[_Row]:
    row = _Row()
    for seq, (prompt, response) in enumerate(s for ex in examples for s in _sequences(ex)):
        row.add_sequence(prompt, response, seq)
    return [row]


def _pack_shared(examples: list[PairExample]) -> list[_Row]:
    row = _Row()
    for i, ex in enumerate(examples):
        start = row.add_sequence(ex.prompt_ids, ex.chosen_ids, 2 * i)
        p_end = start + len(ex.prompt_ids)
        r_start = len(row.ids)
        row.ids += ex.rejected_ids
        row.pos += list(range(len(ex.prompt_ids), len(ex.prompt_ids) + len(ex.rejected_ids)))
        row.segments.append((r_start, len(row.ids), start, p_end))
        predictors = [p_end - 1] + list(range(r_start, r_start + len(ex.rejected_ids) - 1))
        row.targets += [(q, tok, 2 * i + 1) for q, tok in zip(predictors, ex.rejected_ids)]
    return [row]


def _to_batch(rows: list[_Row], examples: list, pad_id: int, multiple: int | None, packed: bool) -> Batch:
    width = max(len(r.ids) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    index, tokens, seqs = [], [], []
    for r, row in enumerate(rows):
        n = len(row.ids)
        ids[r, :n], pos[r, :n], mask[r, :n] = torch.tensor(row.ids), torch.tensor(row.pos), 1
        for q, tok, seq in row.targets:
            index.append(r * width + q)
            tokens.append(tok)
            seqs.append(seq)
    num_seqs = max(seqs) + 1
    seq_tokens = torch.bincount(torch.tensor(seqs), minlength=num_seqs)
    return Batch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=None if packed else mask,
        segments=[row.segments for row in rows] if packed else None,
        target_index=torch.tensor(index, dtype=torch.long),
        target_ids=torch.tensor(tokens, dtype=torch.long),
        target_seq=torch.tensor(seqs, dtype=torch.long),
        seq_tokens=seq_tokens,
        row_ids=torch.tensor([ex.row_id for ex in examples], dtype=torch.long),
        num_seqs=num_seqs,
        num_tokens=sum(len(r.ids) for r in rows),
    )
