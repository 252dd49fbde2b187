"""Shared pieces of the data-prep stages: jsonl shards written atomically, sharding, reward functions."""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
from collections.abc import Callable, Iterable


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
    return rows


def read_parts(folder: str) -> list[dict]:
    """All finished part files of a stage folder (written atomically, so never half a file)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "part-*.jsonl"))):
        rows.extend(read_jsonl(path))
    return rows


def done_ids(folder: str) -> set[str]:
    return {str(r["id"]) for r in read_parts(folder)}


def write_part(folder: str, name: str, rows: Iterable[dict]) -> str:
    """Write `part-<name>.jsonl` via a temp file + rename: a kill leaves either nothing or the whole part."""
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"part-{name}.jsonl")
    tmp = os.path.join(folder, f".tmp-{name}-{os.getpid()}.jsonl")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`i/n`, else RANK/WORLD_SIZE from the deepspeed launcher, else 0/1."""
    if spec:
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n (e.g. 0/2), got {spec!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"--shard {spec}: need 0 <= i < n")
        return i, n
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def prompt_ids_of(rows: list[dict]) -> list[dict]:
    """Give every prompt row a string id (its line number when the file has none); ids must be unique."""
    out, seen = [], set()
    for n, row in enumerate(rows):
        row = {**row, "id": str(row.get("id", n))}
        if row["id"] in seen:
            raise ValueError(f"duplicate prompt id {row['id']!r}: ids must be unique")
        seen.add(row["id"])
        out.append(row)
    return out


def load_function(spec: str) -> Callable:
    """`package.module:function` → the callable, with a one-line error when it is not there."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r}: expected module:function, e.g. data_prep.tasks.sort_task:reward"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {spec!r}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name} has no function {attr!r}")
    return fn


def checked_reward(fn: Callable, spec: str, row: dict, k: int, text: str) -> float:
    try:
        value = fn(row_prompt(row), text, row.get("metadata") or {})
    except Exception as exc:  # the user's function: report where, not a deep traceback
        raise ValueError(
            f"reward function {spec} raised on prompt id {row['id']} candidate {k}: {exc!r}"
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"reward function {spec} returned {value!r} for prompt id {row['id']} candidate {k}; "
                         "it must return a finite float")  # fmt: skip
    return float(value)


def row_prompt(row: dict):
    return row["messages"] if "messages" in row else row["prompt"]
