"""Shared pieces of the data-prep stages: jsonl shards written atomically, sharding, reward functions."""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
import numbers
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


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


# ----------------------------------------------------------------------------- model placement (score, evaluate)
DTYPES = ("bfloat16", "float16", "float32")  # --dtype choices, besides "auto"; bf16/fp16/fp32 also accepted
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def accelerator_device(local_rank: int | None = None):
    """`cuda:LOCAL_RANK` where CUDA is present (LOCAL_RANK from the launcher, 0 alone), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    count = torch.cuda.device_count()
    if not 0 <= rank < count:
        raise ValueError(
            f"LOCAL_RANK={rank} but this process sees {count} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "start at most one process per visible GPU"
        )
    return torch.device("cuda", rank)


def default_dtype(device, flag: str | None = None):
    """`--dtype bfloat16|float16|float32` (or bf16|fp16|fp32) when given; None/auto: bf16 on CUDA, fp32 on CPU."""
    import torch

    if flag in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    name = _DTYPE_ALIASES.get(flag, flag)
    if name not in DTYPES:
        raise ValueError(f"--dtype {flag!r}: choose one of auto, {', '.join(DTYPES)}")
    return getattr(torch, name)


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


def json_object(text: str) -> dict:
    """argparse type of --chat-template-kwargs: a JSON object, e.g. '{"enable_thinking": false}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}"
        )
    return value


def add_chat_template_args(p: argparse.ArgumentParser) -> None:
    """--chat-template-kwargs, unless the parser has it already (the pipeline: one flag for the policy's and
    the reward model's templates, as with --dtype)."""
    try:
        p.add_argument("--chat-template-kwargs", type=json_object, default={}, metavar="JSON",
                       help="extra chat template options as a JSON object, e.g. '{\"enable_thinking\": false}'; "
                       "give what training's data.chat_template_kwargs holds")  # fmt: skip
    except argparse.ArgumentError:
        pass


def load_function(spec: str) -> Callable:
    """`package.module:function` → the callable, with a one-line error when it is not there."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r}: expected module:function, e.g. data_prep.tasks.sort_task:reward"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing (SyntaxError, a raise at import)
        raise ValueError(
            f"reward function {spec!r}: cannot import {module_name} ({type(exc).__name__}: {exc})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        what = f"{module_name} has no function {attr!r}"
        if fn is not None:
            what = f"{module_name}.{attr} is a {type(fn).__name__}, not a function"
        raise ValueError(f"reward function {spec!r}: {what}")
    return fn


def checked_reward(fn: Callable, spec: str, row: dict, k: int, text: str) -> float:
    prompt, row_id = row_prompt(row), row.get("id")
    try:
        value = fn(prompt, text, row.get("metadata") or {})
    except Exception as exc:  # the user's function: report where, not a deep traceback
        raise ValueError(
            f"reward function {spec} raised on prompt id {row_id} candidate {k}: {exc!r}"
        ) from None
    # numbers.Real: int, float and numpy floats; bool is an int but never a reward
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"reward function {spec} returned {value!r} for prompt id {row_id} candidate {k}; "
                         "it must return a finite float")  # fmt: skip
    return float(value)


def row_prompt(row: dict):
    if "messages" in row:
        return row["messages"]
    if "prompt" in row:
        return row["prompt"]
    raise ValueError(
        f"prompt id {row.get('id')}: the row has neither 'prompt' nor 'messages' (columns: {sorted(row)})"
    )


def require_keys(rows: list[dict], keys: tuple[str, ...], folder: str, stage: str) -> None:
    """Every row holds `keys` (and list values where a list is expected), else one line naming the row."""
    for n, row in enumerate(rows, 1):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(
                f"{folder}: row {n} (id {row.get('id')}) has no {missing}; was it written by {stage}?"
            )
        if "candidates" in keys and not isinstance(row["candidates"], list):
            raise ValueError(f"{folder}: row {n} (id {row['id']}): 'candidates' must be a list of strings")


# ----------------------------------------------------------------------------------------------------------
# Placement: which device(s) each generation process gets. Pure functions over an environment mapping, so
# they are tested without a GPU (tests/unit/test_placement.py).


def visible_gpus(
    environ: Mapping[str, str] | None = None, count: Callable[[], int] | None = None
) -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES when set (the deepspeed launcher sets it),
    else 0..count()-1 (default count: `nvidia-smi -L`, so CUDA is not initialised before pinning)."""
    environ = os.environ if environ is None else environ
    spec = environ.get("CUDA_VISIBLE_DEVICES")
    if spec is not None:
        return [g.strip() for g in spec.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range((count or _nvidia_smi_count)())]


def _nvidia_smi_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


@dataclass(frozen=True)
class Launch:
    """RANK/WORLD_SIZE/LOCAL_RANK of the deepspeed launcher or torchrun (LOCAL_SIZE / LOCAL_WORLD_SIZE)."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int


def launcher_ranks(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launcher's ranks, or None when this process was not started by `deepspeed` / `torchrun`."""
    environ = os.environ if environ is None else environ
    if not all(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    world = int(environ["WORLD_SIZE"])
    local_size = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or world)
    return Launch(int(environ["RANK"]), world, int(environ["LOCAL_RANK"]), local_size)


@dataclass(frozen=True)
class Placement:
    """GPU ids for one process (CUDA_VISIBLE_DEVICES), or none on CPU with `threads` OMP threads."""

    gpus: tuple[str, ...]
    threads: int | None = None

    def env(self) -> dict[str, str]:
        if self.gpus:
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)}
        return {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}


def place(proc_index: int, procs: int, tp: int, gpus: list[str], cpus: int | None = None) -> Placement:
    """Process `proc_index` of `procs` on one node gets GPUs [i·tp, (i+1)·tp) of `gpus`; without GPUs it runs
    on the CPU with cpus // procs threads. Too few GPUs for procs × tp is one error line."""
    if procs < 1 or not 0 <= proc_index < procs:
        raise ValueError(f"process {proc_index} of {procs}: need procs >= 1 and 0 <= index < procs")
    if tp < 1:
        raise ValueError(f"--tensor-parallel-size {tp}: must be >= 1")
    if not gpus:
        if tp > 1:
            raise ValueError(f"--tensor-parallel-size {tp} needs GPUs and none is visible; use 1 on the CPU")
        return Placement((), max(1, (cpus or os.cpu_count() or 1) // procs) if procs > 1 else None)
    if tp > len(gpus):
        raise ValueError(f"--tensor-parallel-size {tp} is larger than the {len(gpus)} visible GPU(s) "
                         f"({','.join(gpus)}); lower it to at most {len(gpus)}")  # fmt: skip
    if procs * tp > len(gpus):
        raise ValueError(f"{procs} processes × tensor-parallel size {tp} need {procs * tp} GPUs but "
                         f"{len(gpus)} are visible ({','.join(gpus)}); use --procs {len(gpus) // tp} "
                         "(or fewer processes per node under the launcher)")  # fmt: skip
    return Placement(tuple(gpus[proc_index * tp : (proc_index + 1) * tp]))
