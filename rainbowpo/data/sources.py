"""Rows from data sources: local jsonl/json/parquet/csv, a `save_to_disk` folder, or a hub dataset.

All go through `datasets` (loading and caching); a column mapping renames their columns to ours;
several sources mix by weight (w = 1 takes a source once, 0.5 half of it, 2 twice), seeded.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import datasets

from rainbowpo.config import SourceConfig

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROW_INDEX = "__rainbowpo_row__"  # column added by load_tables: the row's 1-based number in its source


@dataclass(frozen=True)
class SourceRow:
    source: str  # e.g. "data.train[0] pairs.jsonl"
    index: int  # 1-based row number inside the source
    row: dict


def read_source(src: SourceConfig):
    """A `datasets.Dataset` for one source (same code path for local files, folders and hub names)."""
    datasets.disable_progress_bars()
    path = src.path
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise ValueError(
                f"data source {path}: a folder, but not one written by datasets.save_to_disk; "
                f"give a file path ({'/'.join(LOADERS)}) instead"
            ) from None
        except Exception as exc:  # e.g. an empty or half-written save_to_disk folder
            raise ValueError(
                f"data source {path}: cannot load this save_to_disk folder ({type(exc).__name__}: "
                f"{_first_line(exc)}); is it empty or half written?"
            ) from None
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded
        if src.split not in loaded:
            raise ValueError(
                f"data source {path}: no split {src.split!r}; set split: to one of {sorted(loaded)}"
            )
        return loaded[src.split]
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and ext not in LOADERS:
        raise ValueError(f"data source {path}: unsupported file type {ext!r}; use one of {list(LOADERS)}")
    if ext in LOADERS:
        if not os.path.isfile(path):
            raise ValueError(f"data source {path}: file not found")
        try:
            return datasets.load_dataset(LOADERS[ext], data_files=path, split="train")
        except Exception as exc:  # arrow/pandas errors name neither the file nor the line: find it
            raise ValueError(f"data source {path}: {_diagnose(path, ext, exc)}") from None
    try:
        return datasets.load_dataset(path, split=src.split)
    except Exception as exc:  # hub errors are many and deep: one clear line instead
        raise ValueError(
            f"data source {path!r}: not a local file/folder and not loadable as a dataset "
            f"({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc).strip() or type(exc).__name__
    if cause is not None and "error occurred while generating" in text:  # datasets' wrapper says nothing
        text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0]


def _diagnose(path: str, ext: str, exc: BaseException) -> str:
    """Why a local file failed to load, as one line: empty, or the first line that is not a JSON object."""
    with open(path, errors="replace") as f:
        text = f.read()
    if not text.strip():
        return "the file is empty (no rows)"
    if "corresponds to no data" in str(exc):  # e.g. a csv with only its header line
        return "the file has no rows"
    if ext == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {n} is not valid JSON ({err.msg}, column {err.colno})"
            if not isinstance(row, dict):
                return f"line {n} is not a JSON object (got {type(row).__name__}); each line must be one row {{...}}"
    if ext == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            return f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        if isinstance(rows, list) and not all(isinstance(r, dict) for r in rows):
            return "a .json source must be a list of row objects [{...}, ...]"
    return f"cannot read it as {LOADERS[ext]} ({_first_line(exc)})"


def load_tables(
    sources: list[SourceConfig], seed: int, label: str = "data.train"
) -> list[tuple[str, object]]:
    """(name, `datasets.Dataset`) per source: column-mapped, rows drawn by weight (seeded), and a 1-based
    `ROW_INDEX` column giving each row's number inside its source. Rows stay in Arrow (never Python dicts)."""
    rng = random.Random(seed)
    tables = []
    for i, src in enumerate(sources):
        name = f"{label}[{i}] {os.path.basename(src.path.rstrip('/')) or src.path}"
        table = read_source(src)
        if len(table) == 0:
            raise ValueError(f"{name}: the source has no rows ({src.path})")
        missing = [theirs for theirs in src.columns.values() if theirs not in table.column_names]
        if missing:
            raise ValueError(
                f"{name}: column mapping names {missing}, not in the columns {table.column_names}"
            )
        rename = {theirs: ours for ours, theirs in src.columns.items() if theirs != ours}
        shadowed = [c for c in rename.values() if c in table.column_names and c not in rename]
        table = table.remove_columns(shadowed).rename_columns(rename)  # the mapped column wins
        indices = _weighted_indices(len(table), src.weight, rng)
        if indices != list(range(len(table))):
            table = table.select(indices)
        tables.append((name, table.add_column(ROW_INDEX, [j + 1 for j in indices])))
    return tables


def _weighted_indices(n: int, weight: float, rng: random.Random) -> list[int]:
    whole, frac = divmod(weight, 1.0)
    indices = list(range(n)) * int(whole)
    indices += sorted(rng.sample(range(n), round(frac * n))) if frac else []
    return indices
