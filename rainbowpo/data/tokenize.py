"""Texts → token ids with an exact prompt/response boundary, truncation, and a start-up summary. SPEC §2.

Boundary rule: the prompt and each response are tokenized separately and the ids concatenated — a
joined string is never re-tokenized. The prompt gets the tokenizer's special tokens (one BOS at most:
none if the chat template already rendered it, none for tokenizers without BOS); each response gets no
special tokens and exactly one EOS appended. Response token counts include that EOS.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tqdm.auto import tqdm

from rainbowpo.config import DataConfig, SourceConfig
from rainbowpo.data.formats import BadRow, row_texts
from rainbowpo.data.render import encode_prompt
from rainbowpo.data.sources import load_rows


@dataclass(frozen=True)
class PairExample:
    row_id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class SFTExample:
    row_id: int
    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class DataSummary:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)

    def format(self) -> str:
        def stats(xs: list[int]) -> str:
            return f"mean {statistics.fmean(xs):.1f} max {max(xs)}" if xs else "-"

        total = sum(self.prompt_lengths) + sum(self.response_lengths)
        return (
            f"data: {self.read} rows read, {self.kept} kept, {self.truncated} truncated, "
            f"dropped {dict(self.dropped) or 0}, skipped bad rows {dict(self.skipped) or 0} | "
            f"prompt tokens {stats(self.prompt_lengths)} | response tokens {stats(self.response_lengths)} | "
            f"{total} tokens"
        )


def load_examples(
    data: DataConfig, sources: list[SourceConfig], tokenizer, mode: Literal["preference", "sft"], seed: int
) -> tuple[list, DataSummary]:
    """Read, validate, tokenize and truncate; returns examples (row_id 0..N-1) and the summary."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no EOS token: set tokenizer.eos_token (every response must end with one)"
        )
    label = "data.eval" if sources is data.eval and sources is not data.train else "data.train"
    rows = load_rows(sources, seed, label)
    summary = DataSummary(read=len(rows))
    examples: list = []
    for item in tqdm(rows, desc="tokenize", disable=len(rows) < 5000):
        try:
            texts = row_texts(item.row, data.format, mode, tokenizer)
        except BadRow as bad:
            if (
                bad.kind == "no_chat_template"
            ):  # the tokenizer's problem, not the row's: skipping would drop them all
                raise ValueError(
                    f"{item.source} row {item.index} is conversational but the tokenizer has no chat template; "
                    "add one to the model folder's tokenizer_config.json or use string rows"
                ) from None
            if data.on_bad_row == "skip":
                summary.skipped[bad.kind] += 1
                continue
            raise ValueError(
                f"{item.source} row {item.index}: {bad}; fix the row or set data.on_bad_row: skip"
            ) from None
        ids = truncate(
            data,
            tokenizer,
            encode_prompt(tokenizer, texts.prompt),
            [encode_response(tokenizer, r) for r in texts.responses],
            summary,
        )
        if ids is None:
            continue
        prompt, responses = ids
        row_id = len(examples)
        examples.append(
            PairExample(row_id, prompt, *responses)
            if mode == "preference"
            else SFTExample(row_id, prompt, responses[0])
        )
        summary.prompt_lengths.append(len(prompt))
        summary.response_lengths.extend(len(r) for r in responses)
    summary.kept = len(examples)
    if not examples:
        raise ValueError(
            f"no usable rows in {[s.path for s in sources]}: {summary.format()}; "
            "fix the rows (see the skip counts) or raise data.max_length (see the drop counts)"
        )
    return examples, summary


def encode_response(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    while ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids + [tokenizer.eos_token_id]


def truncate(
    data: DataConfig, tokenizer, prompt: list[int], responses: list[list[int]], summary: DataSummary
):
    """Prompt cut from its start (BOS kept), responses from their end; None when nothing of a response fits."""
    cut = False
    if len(prompt) > data.max_prompt_length:
        bos = (
            [prompt[0]] if tokenizer.bos_token_id is not None and prompt[0] == tokenizer.bos_token_id else []
        )
        prompt = bos + prompt[len(prompt) - (data.max_prompt_length - len(bos)) :]
        cut = True
    budget = data.max_length - len(prompt)
    if budget < 1:
        summary.dropped["too_long"] += 1
        return None
    out = []
    for r in responses:
        if len(r) > budget:
            r = (
                r[: budget - 1] + [tokenizer.eos_token_id]
                if data.truncation_keep_eos and budget > 1
                else r[:budget]
            )
            cut = True
        out.append(r)
    if len(out) == 2 and out[0] == out[1]:
        summary.dropped["identical_after_truncation"] += 1
        return None
    summary.truncated += int(cut)
    return prompt, out
