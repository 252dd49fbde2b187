"""Texts → token ids with an exact prompt/response boundary, truncation, and a start-up summary. SPEC §2.

Boundary rule: the prompt and each response are tokenized separately and the ids concatenated — a
joined string is never re-tokenized. The prompt gets the tokenizer's special tokens (one BOS at most:
none if the chat template already rendered it, none for tokenizers without BOS). A string response gets
no special tokens and exactly one EOS appended; a conversational response is the rendered conversation's
ids minus the prompt's (`render.response_ids`): it ends as the template ends an assistant turn, once.
Response token counts include that end. `tokenize_row` is the whole per-row step (before truncation).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tqdm.auto import tqdm

from rainbowpo.config import DataConfig, SourceConfig
from rainbowpo.data import render
from rainbowpo.data.formats import BadRow, parse_row, source_format
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


@dataclass(frozen=True)
class RowSettings:
    """What `tokenize_row` needs besides the row: the mode, the row's source format, the template options."""

    mode: Literal["preference", "sft"] = "preference"
    format: str = "standard"  # the source's format (formats.source_format), never "auto"
    chat_template_kwargs: tuple = ()  # sorted (key, value) items of data.chat_template_kwargs

    @classmethod
    def of(cls, data: DataConfig, mode: str, fmt: str) -> RowSettings:
        return cls(mode, fmt, tuple(sorted(data.chat_template_kwargs.items())))


def tokenize_row(tokenizer, row: dict, settings: RowSettings) -> dict[str, list[int]]:
    """One row → {"prompt_ids", "chosen_ids", "rejected_ids"} (SFT: {"prompt_ids", "completion_ids"}),
    before truncation. Raises BadRow (kind + message) for a row that cannot be used."""
    parsed = parse_row(row, settings.format, settings.mode)
    kwargs = dict(settings.chat_template_kwargs)
    keys = ("chosen_ids", "rejected_ids") if settings.mode == "preference" else ("completion_ids",)
    try:
        prompt = render.prompt_ids(tokenizer, parsed.prompt, kwargs)
        if isinstance(parsed.prompt, str):
            responses = [encode_response(tokenizer, r) for r in parsed.responses]
        else:
            responses = [
                render.response_ids(tokenizer, parsed.prompt, r, prompt, kwargs) for r in parsed.responses
            ]
    except render.NoChatTemplate:
        raise BadRow(
            "no_chat_template", "conversational rows need a tokenizer with a chat template"
        ) from None
    except render.TemplatePrefixError as err:
        raise BadRow("template_prefix", str(err)) from None
    if len(responses) == 2 and responses[0] == responses[1]:
        raise BadRow("chosen_equals_rejected", "'chosen' and 'rejected' are identical")
    return {"prompt_ids": prompt, **dict(zip(keys, responses))}


@dataclass
class DataSummary:
    formats: Counter = field(default_factory=Counter)  # "source: format" → rows
    prompt_limit: int = 0  # data.prompt_limit(), as resolved
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
        formats = ", ".join(f"{k} ({n} rows)" for k, n in self.formats.items())
        return (
            f"data: {self.read} rows read, {self.kept} kept, {self.truncated} truncated, "
            f"dropped {dict(self.dropped) or 0}, skipped bad rows {dict(self.skipped) or 0} | "
            f"prompt tokens {stats(self.prompt_lengths)} | response tokens {stats(self.response_lengths)} | "
            f"{total} tokens | formats {formats or '-'} | prompt limit {self.prompt_limit} tokens"
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
    summary = DataSummary(read=len(rows), prompt_limit=data.prompt_limit())
    examples: list = []
    settings = {}  # source → RowSettings, the format decided by the source's first row
    for item in tqdm(rows, desc="tokenize", disable=len(rows) < 5000):
        if item.source not in settings:
            settings[item.source] = RowSettings.of(data, mode, source_format(item.row, data.format, mode))
        summary.formats[f"{item.source}: {settings[item.source].format}"] += 1
        try:
            ids = tokenize_row(tokenizer, item.row, settings[item.source])
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
        ids = truncate(data, tokenizer, ids.pop("prompt_ids"), list(ids.values()), summary)
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
    limit = data.prompt_limit()
    if len(prompt) > limit:
        bos = (
            [prompt[0]] if tokenizer.bos_token_id is not None and prompt[0] == tokenizer.bos_token_id else []
        )
        prompt = bos + prompt[len(prompt) - (limit - len(bos)) :]
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
