"""Checkpoints, in one place: atomic save, resume (also on another world size), completeness per rank.

    root/step-000010/{DeepSpeed shards, trainer_state.json, rng/rank<r>.pt, done/rank<r>, COMPLETE}
    root/step-000010/universal/   # written once when resuming on another number of ranks

Save: every rank writes its shards and RNG state into a temp folder, then its done/rank<r> marker; rank 0
writes trainer_state.json (step, world size, parameter checksum, W&B run id) and COMPLETE only when all
world-size markers are there, then renames the folder. `resume: auto` only ever picks a step-* folder
holding COMPLETE; keep-last-K never deletes the newest complete checkpoint. `output.dir` must be on a
filesystem every rank sees (shared for multi-node): a rank's missing marker stops the save with that message.

Resume on another world size: rank 0 converts the checkpoint with DeepSpeed's universal format
(`python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`) into <ckpt>/universal, the engine
loads it with `checkpoint.load_universal`, and the parameter checksum saved with the checkpoint is compared
with the loaded weights. The data order is a function of the step alone (data/sampler.py), so it continues.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import torch

from rainbowpo import engine as ds

MARKER = "COMPLETE"
UNIVERSAL = "universal"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the intact previous one."""


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(root: str) -> list[str]:
    """Complete checkpoint folders under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, MARKER)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, root: str) -> str | None:
    """output.resume → a checkpoint folder or None (auto: newest complete; never; or an explicit path)."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    if not os.path.isfile(os.path.join(resume, MARKER)):
        if not os.path.exists(resume):
            raise ValueError(
                f"output.resume: {resume} does not exist; give a step-* checkpoint folder, auto or never"
            )
        inside = complete_checkpoints(resume) or complete_checkpoints(os.path.join(resume, "checkpoints"))
        hint = (
            f"; did you mean {inside[-1]}?"
            if inside
            else " (an interrupted save); use resume: auto or another folder"
        )
        raise ValueError(
            f"output.resume: {resume} is not a complete checkpoint (no {MARKER} marker inside){hint}"
        )
    return resume


def write_rank_state(folder: str, rank: int) -> None:
    """This rank's RNG states (torch CPU, Python, and the current CUDA device's where CUDA is present)."""
    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(folder, "rng", f"rank{rank}.pt"))


def read_rank_state(folder: str, rank: int) -> None:
    path = os.path.join(folder, "rng", f"rank{rank}.pt")
    if not os.path.isfile(path):
        return  # a different world size: the data order is still exact (it never depends on RNG)
    try:
        state = torch.load(path, weights_only=True)
        torch.set_rng_state(state["torch"])
        random.setstate((3, tuple(state["python"]), None))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except Exception as exc:  # unpickling/format errors are deep and many
        raise ValueError(
            f"corrupt checkpoint {folder}: cannot restore rng/rank{rank}.pt ({type(exc).__name__}: {exc}); "
            "delete the file to resume with fresh random state"
        ) from None


def finalize(tmp: str, final: str, trainer_state: dict) -> None:
    """Rank 0, after every rank wrote its shards: state, marker (fsynced), rename."""
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(trainer_state, f, indent=1)
    marker = os.path.join(tmp, MARKER)
    with open(marker, "w") as f:
        f.write(json.dumps({"step": trainer_state.get("step")}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def read_trainer_state(folder: str) -> dict:
    path = os.path.join(folder, "trainer_state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt checkpoint {folder}: cannot read trainer_state.json ({exc})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(
            f"corrupt checkpoint {folder}: trainer_state.json has no integer 'step' >= 0 (got {state!r:.80})"
        )
    return state


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temp folders."""
    done = complete_checkpoints(root)
    for path in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- per-rank completeness


def mark_rank_done(folder: str, rank: int) -> None:
    """After this rank's shards and RNG state are written: done/rank<r> (fsynced)."""
    os.makedirs(os.path.join(folder, "done"), exist_ok=True)
    with open(os.path.join(folder, "done", f"rank{rank}"), "w") as f:
        f.write("ok")
        f.flush()
        os.fsync(f.fileno())


def missing_ranks(folder: str, world_size: int) -> list[int]:
    """Ranks whose done marker this process cannot see in `folder`."""
    return [r for r in range(world_size) if not os.path.isfile(os.path.join(folder, "done", f"rank{r}"))]


def missing_ranks_message(folder: str, missing: list[int], world_size: int) -> str:
    return (
        f"checkpoint {folder} is incomplete: the shards of rank(s) {missing} of {world_size} are not there "
        "(written to another node's disk?); output.dir must be shared by all nodes. It is not marked "
        "COMPLETE and resume: auto will not pick it"
    )


# ----------------------------------------------------------------------------- save / restore


def save(run, root: str) -> None:
    """Every rank writes into a temp folder and marks its part done; every rank checks that all ranks' markers
    are visible (so all stop together when one is not); rank 0 adds the state and COMPLETE last, renames.

    A failure (disk full, quota, a rank's shard elsewhere) leaves the previous complete checkpoint untouched
    and says so."""
    step = run.state["step"]
    final = os.path.join(root, step_tag(step))
    if os.path.isdir(final):
        return
    tmp = os.path.join(root, ".tmp-" + step_tag(step))
    checksum = run.policy.param_checksum()  # a collective under ZeRO-3: every rank, outside the try
    try:
        if run.dist.is_main:
            os.makedirs(root, exist_ok=True)
            remove_tree(tmp)
        ds.barrier()
        run.policy.save(root, os.path.basename(tmp))
        write_rank_state(tmp, run.dist.rank)
        mark_rank_done(tmp, run.dist.rank)
        ds.barrier()
        # Every rank looks, and the gather returns only after all have looked: rank 0 renames the folder
        # below, and a rank still about to look would then find no marker at all (seen as a flaky failure).
        seen = ds.all_gather_objects(missing_ranks(tmp, run.dist.world_size))
        missing = sorted(set().union(*seen))
        if missing:
            raise CheckpointError(missing_ranks_message(tmp, missing, run.dist.world_size))
        if run.dist.is_main:
            state = {**run.state, "world_size": run.dist.world_size, "total_steps": run.total_steps,
                     "param_checksum": checksum}  # fmt: skip
            finalize(tmp, final, state)
            prune(root, run.cfg.output.keep_last)
    except OSError as exc:
        previous = complete_checkpoints(root)
        raise CheckpointError(
            f"saving the step-{step} checkpoint failed ({exc}); "
            + (f"{previous[-1]} is intact and output.resume: auto continues from it" if previous
               else "there is no earlier checkpoint")
            + "; free disk space and restart"
        ) from None  # fmt: skip
    ds.barrier()


@dataclass(frozen=True)
class Resume:
    """The checkpoint to continue from; `universal` when it was saved by another number of ranks."""

    folder: str
    state: dict
    universal: bool


def plan_resume(resume: str, root: str, world_size: int) -> Resume | None:
    """output.resume → what to load (before the engine is built: a universal load is an engine setting)."""
    folder = resolve_resume(resume, root)
    if folder is None:
        return None
    state = read_trainer_state(folder)
    saved = int(state.get("world_size", world_size))
    return Resume(folder, state, universal=saved != world_size)


def prepare_universal(plan: Resume, is_main: bool) -> None:
    """Rank 0 converts once (kept in <ckpt>/universal for later resumes); the others wait at a barrier."""
    if is_main and not os.path.isdir(os.path.join(plan.folder, UNIVERSAL)):
        print(
            f"resuming {plan.state.get('world_size')}-rank checkpoint {plan.folder} on "
            f"{torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1} ranks: "
            "converting it to DeepSpeed's universal format",
            flush=True,
        )
        convert_to_universal(plan.folder)
    ds.barrier()


def convert_to_universal(folder: str) -> str:
    """`python -m deepspeed.checkpoint.ds_to_universal` into folder/universal (via a temp name, so an
    interrupted conversion is redone); `--inject_missing_state` because HF models carry no universal info."""
    out, tmp = os.path.join(folder, UNIVERSAL), os.path.join(folder, UNIVERSAL + ".tmp")
    remove_tree(tmp)
    cpus = os.cpu_count() or 1  # DeepSpeed's defaults are 4 extract and 2 merge processes
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
           "--output_folder", tmp, "--inject_missing_state", "--num_extract_workers", str(min(4, cpus)),
           "--num_merge_workers", str(min(2, cpus))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isdir(os.path.join(tmp, "zero")):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(
            f"converting {folder} to a universal checkpoint for another world size failed ({tail[0][:200]}); "
            f"resume on the checkpoint's own world size, or run `{' '.join(cmd[1:])}` to see the error"
        )
    os.replace(tmp, out)
    return out


def restore(run, plan: Resume) -> None:
    """Load weights, optimizer and schedule; this rank's RNG (same world size); check the parameter checksum."""
    if plan.universal:
        run.policy.load(plan.folder, UNIVERSAL)
    else:
        run.policy.load(os.path.dirname(plan.folder), os.path.basename(plan.folder))
    read_rank_state(plan.folder, run.dist.rank)
    verify_checksum(plan, run.policy.param_checksum())
    run.state.update(step=int(plan.state["step"]))
    if plan.state.get("wandb_id"):
        run.state["wandb_id"] = plan.state["wandb_id"]
    if run.dist.is_main:
        via = " (universal conversion)" if plan.universal else ""
        print(f"resumed from {plan.folder}{via} at step {run.state['step']} / {run.total_steps}")


def verify_checksum(plan: Resume, loaded: list[float], rel: float = 1e-6) -> None:
    """The loaded weights' [Σw, Σw²] must equal the saved one (a silent fresh start is caught here)."""
    saved = plan.state.get("param_checksum")
    if not saved:
        return  # a checkpoint from before checksums
    if not all(math.isclose(a, b, rel_tol=rel, abs_tol=1e-6) for a, b in zip(saved, loaded, strict=True)):
        raise CheckpointError(
            f"the weights loaded from {plan.folder}{' (universal)' if plan.universal else ''} do not match the "
            f"saved ones (checksum [Σw, Σw²] saved {saved}, loaded {loaded}); do not continue from this load. "
            + ("Delete its universal/ folder to redo the conversion, or resume on "
               f"{plan.state.get('world_size')} ranks" if plan.universal else "The checkpoint may be corrupt")
        )  # fmt: skip
