"""Atomic checkpoints: shards go to a temp folder, the marker is written last, then one rename.

    root/step-000010/{DeepSpeed shards, trainer_state.json, rng/rank0.pt, COMPLETE}

`resume: auto` only ever picks a folder named step-* holding COMPLETE; keep-last-K never deletes the
newest complete checkpoint. `output.dir` must be on a filesystem every rank sees (shared for multi-node).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

MARKER = "COMPLETE"
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
    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    torch.save(state, os.path.join(folder, "rng", f"rank{rank}.pt"))


def read_rank_state(folder: str, rank: int) -> None:
    path = os.path.join(folder, "rng", f"rank{rank}.pt")
    if not os.path.isfile(path):
        return  # a different world size: the data order is still exact (it never depends on RNG)
    try:
        state = torch.load(path, weights_only=True)
        torch.set_rng_state(state["torch"])
        random.setstate((3, tuple(state["python"]), None))
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
