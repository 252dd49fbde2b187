"""Rows from data sources: local jsonl/json/parquet/csv, a `save_to_disk` folder, or a hub dataset.

All go through `datasets` (loading and caching); a column mapping renames their columns to ours;
several sources mix by weight (w = 1 takes a source once, 0.5 half of it, 2 twice), seeded.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from rainbowpo.config import SourceConfig

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class SourceRow:
    source: str  # e.g. "data.train[0] pairs.jsonl"
    index: int  # 1-based row number inside the source
    row: dict


def read_source(src: SourceConfig):
    """A `datasets.Dataset` for one source (same code path for local files, folders and hub names)."""
    import datasets

    datasets.disable_progress_bars()
    path = src.path
    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        return loaded[src.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    ext = os.path.splitext(path)[1].lower()
    if ext in LOADERS:
        if not os.path.isfile(path):
            raise ValueError(f"data source {path}: file not found")
        return datasets.load_dataset(LOADERS[ext], data_files=path, split="train")
    try:
        return datasets.load_dataset(path, split=src.split)
    except Exception as exc:  # hub errors are many and deep: one clear line instead
        raise ValueError(
            f"data source {path!r}: not a local file/folder and not loadable as a dataset ({exc})"
        ) from None


def load_rows(sources: list[SourceConfig], seed: int, label: str = "data.train") -> list[SourceRow]:
    """Rows of every source, column-mapped and mixed by weight, in a deterministic order."""
    rng = random.Random(seed)
    rows: list[SourceRow] = []
    for i, src in enumerate(sources):
        name = f"{label}[{i}] {os.path.basename(src.path.rstrip('/')) or src.path}"
        table = read_source(src)
        missing = [theirs for theirs in src.columns.values() if theirs not in table.column_names]
        if missing:
            raise ValueError(
                f"{name}: column mapping names {missing}, not in the columns {table.column_names}"
            )
        records = table.to_list()
        rename = {theirs: ours for ours, theirs in src.columns.items()}
        records = [{rename.get(k, k): v for k, v in r.items()} for r in records]
        for index in _weighted_indices(len(records), src.weight, rng):
            rows.append(SourceRow(name, index + 1, records[index]))
    return rows


def _weighted_indices(n: int, weight: float, rng: random.Random) -> list[int]:
    whole, frac = divmod(weight, 1.0)
    indices = list(range(n)) * int(whole)
    indices += sorted(rng.sample(range(n), round(frac * n))) if frac else []
    return indices
