"""Texts → token ids with an exact prompt/response boundary, truncation, and a start-up summary. SPEC §2.

Boundary rule: the prompt and each response are tokenized separately and the ids concatenated — a
joined string is never re-tokenized. The prompt gets the tokenizer's special tokens (one BOS at most:
none if the chat template already rendered it, none for tokenizers without BOS). A string response gets
no special tokens and exactly one EOS appended; a conversational response is the rendered conversation's
ids minus the prompt's (`render.response_ids`): it ends as the template ends an assistant turn, once.
Response token counts include that end. `tokenize_row` is the whole per-row step (before truncation).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rainbowpo.config import DataConfig, SourceConfig
from rainbowpo.data import cache, render
from rainbowpo.data.cache import TokenizedSet
from rainbowpo.data.formats import BadRow, parse_row, source_format
from rainbowpo.data.sources import ROW_INDEX, SourceRow, load_tables


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
    prompt_limit: int = 0  # data.prompt_limit(), as resolved (set once, never summed)
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)

    def format(self) -> str:
        def stats(xs: list[int]) -> str:
            return f"mean {np.mean(xs):.1f} max {np.max(xs)}" if len(xs) else "-"

        total = int(np.sum(self.prompt_lengths) + np.sum(self.response_lengths))
        formats = ", ".join(f"{k} ({n} rows)" for k, n in self.formats.items())
        return (
            f"data: {self.read} rows read, {self.kept} kept, {self.truncated} truncated, "
            f"dropped {dict(self.dropped) or 0}, skipped bad rows {dict(self.skipped) or 0} | "
            f"prompt tokens {stats(self.prompt_lengths)} | response tokens {stats(self.response_lengths)} | "
            f"{total} tokens | formats {formats or '-'} | prompt limit {self.prompt_limit} tokens"
        )

    def add_counts(self, counts: dict) -> None:
        """Sum a batch's counters into this summary (the resolved prompt limit is set, not summed)."""
        for name, value in counts.items():
            if name == "prompt_limit":
                self.prompt_limit = value or self.prompt_limit  # batches carry 0: not theirs to say
            else:
                setattr(
                    self, name, getattr(self, name) + (Counter(value) if isinstance(value, dict) else value)
                )


def load_examples(
    data: DataConfig, sources: list[SourceConfig], tokenizer, mode: Literal["preference", "sft"], seed: int
) -> tuple[TokenizedSet, DataSummary]:
    """Read, validate, tokenize and truncate — once: local rank 0 builds the cache (rainbowpo.data.cache),
    the other ranks and later runs memory-map it. Returns the rows (row_id 0..N-1) and the summary."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no EOS token: set tokenizer.eos_token (every response must end with one)"
        )
    label = "data.eval" if sources is data.eval and sources is not data.train else "data.train"
    k = 3 if mode == "preference" else 2
    key = cache.cache_key(data, sources, tokenizer, mode, seed)
    folder, _ = cache.load_or_build(
        data.cache_dir or cache.default_cache_dir(),
        key,
        lambda tmp: _build(tmp, key, data, sources, tokenizer, mode, seed, label),
    )
    ids, offsets, counts = cache.read(folder, k)
    examples = cache.TokenizedSet(ids, offsets, k, PairExample if k == 3 else SFTExample, folder)
    lengths = examples.lengths()
    summary = DataSummary(
        prompt_limit=data.prompt_limit(),
        prompt_lengths=lengths[:, 0].tolist(),
        response_lengths=lengths[:, 1:].ravel().tolist(),
    )
    summary.add_counts(counts)
    return examples, summary


def _build(folder, key, data, sources, tokenizer, mode, seed, label) -> None:
    """Tokenize every source with `datasets.map` (batched, data.num_proc workers) into the cache files."""
    tables = load_tables(sources, seed, label)
    summary = DataSummary(read=sum(len(t) for _, t in tables), prompt_limit=data.prompt_limit())
    pieces = []
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = data.num_proc or (min(16, cpus) if summary.read >= 10_000 else 1)
    datasets.enable_progress_bars()
    try:
        for i, (name, table) in enumerate(tables):
            pieces.append(
                table.map(
                    _encode_batch,
                    fn_kwargs={
                        "data": data,
                        "tokenizer": tokenizer,
                        "source": name,
                        "settings": RowSettings.of(data, mode, _first_row_format(table, data, mode)),
                    },  # fmt: skip
                    batched=True,
                    batch_size=256,
                    num_proc=workers if workers > 1 and len(table) > 1 else None,
                    remove_columns=table.column_names,
                    features=ENCODED,
                    cache_file_name=os.path.join(folder, "map", f"{i}.arrow"),
                    new_fingerprint=f"{key}-{i}",  # ours: datasets cannot hash a tokenizer reliably
                    desc=f"tokenize {name}",
                )
            )
    finally:
        datasets.disable_progress_bars()
    table = datasets.concatenate_datasets(pieces).data.table
    errors = np.flatnonzero(pc.binary_length(table.column("error")).to_numpy(zero_copy_only=False) > 0)
    if len(errors):  # the first bad row in source order, whichever worker met it
        raise ValueError(table.column("error")[int(errors[0])].as_py())
    for part in table.column("summary").to_pylist():
        summary.add_counts(json.loads(part or "{}"))
    lens = table.column("lens").combine_chunks().flatten().to_numpy()
    summary.kept = len(lens) // (3 if mode == "preference" else 2)
    if not summary.kept:
        raise ValueError(
            f"no usable rows in {[s.path for s in sources]}: {summary.format()}; "
            "fix the rows (see the skip counts) or raise data.max_length (see the drop counts)"
        )
    offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    counts = {k: v for k, v in vars(summary).items() if not k.endswith("_lengths")}
    id_chunks = (c.flatten().to_numpy() for c in table.column("ids").chunks)  # views of the map's files
    cache.write(folder, id_chunks, offsets, 3 if mode == "preference" else 2, key, counts)
    del table, pieces
    shutil.rmtree(os.path.join(folder, "map"), ignore_errors=True)
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed JSON-reading buffers


ENCODED = datasets.Features(
    {
        "ids": datasets.Sequence(datasets.Value("int32")),  # prompt + responses, end to end; [] if not kept
        "lens": datasets.Sequence(datasets.Value("int32")),  # their lengths; [] if not kept
        "error": datasets.Value("string"),  # the row's error with on_bad_row: error, else ""
        "summary": datasets.Value("string"),  # the batch's counters as JSON, on its first row only
    }
)


def _first_row_format(table, data: DataConfig, mode: str) -> str:
    """The source's format, decided by its first row (formats.source_format)."""
    first = {k: v for k, v in table[0].items() if k != ROW_INDEX}
    return source_format(first, data.format, mode)


def _encode_batch(batch: dict, data: DataConfig, tokenizer, source: str, settings: RowSettings) -> dict:
    """`datasets.map` function: a batch of rows → ENCODED columns (one output row per input row)."""
    part = DataSummary()
    names = [c for c in batch if c != ROW_INDEX]
    out = {"ids": [], "lens": [], "error": [], "summary": []}
    for n, index in enumerate(batch[ROW_INDEX]):
        item = SourceRow(source, index, {c: batch[c][n] for c in names})
        try:
            ids = encode_row(data, tokenizer, settings, item, part)
        except ValueError as exc:
            ids, error = None, str(exc)
        else:
            error = ""
        out["ids"].append([t for seg in ids for t in seg] if ids else [])
        out["lens"].append([len(seg) for seg in ids] if ids else [])
        out["error"].append(error)
    counts = {k: v for k, v in vars(part).items() if not k.endswith("_lengths")}
    out["summary"] = [json.dumps(counts)] + [""] * (len(out["ids"]) - 1)
    return out


def encode_row(data: DataConfig, tokenizer, settings: RowSettings, item: SourceRow, summary: DataSummary):
    """One row → [prompt ids, response ids...] after truncation, or None (skipped / dropped, counted)."""
    summary.formats[f"{item.source}: {settings.format}"] += 1
    try:
        ids = tokenize_row(tokenizer, item.row, settings)
    except BadRow as bad:
        if bad.kind == "no_chat_template":  # the tokenizer's fault, not the row's: a skip would drop all
            raise ValueError(
                f"{item.source} row {item.index} is conversational but the tokenizer has no chat template; "
                "add one to the model folder's tokenizer_config.json or use string rows"
            ) from None
        if data.on_bad_row == "skip":
            summary.skipped[bad.kind] += 1
            return None
        raise ValueError(
            f"{item.source} row {item.index}: {bad}; fix the row or set data.on_bad_row: skip"
        ) from None
    ids = truncate(data, tokenizer, ids.pop("prompt_ids"), list(ids.values()), summary)
    if ids is None:
        return None
    prompt, responses = ids
    return [prompt, *responses]


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
