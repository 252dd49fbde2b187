"""Nothing lost under kills and non-finite losses (docs/reliability.md).

- SIGKILL of a 2-rank run in the middle of a checkpoint save, then again between steps; each restart
  with output.resume: auto; the result equals an uninterrupted run and metrics.jsonl has every step once.
- A non-finite loss: on_nan stop names step, rows and the last good checkpoint and saves nothing;
  on_nan skip_step skips every poisoned step and leaves the weights untouched.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, base_overrides, final_weights, launch, read_metrics, train_command
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

COMMON = {"train.epochs": 4, "train.max_steps": 8, "output.save_every": 1, "output.keep_last": 2,
          "objective.preset": "dpo"}  # fmt: skip


def start(overrides: list[str]) -> subprocess.Popen:
    """A 2-rank deepspeed launch in its own process group (so one killpg takes the launcher and ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(train_command(overrides, 2), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the whole process group as soon as ready() holds (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def saving(ckpts: Path, min_step: int):
    """True while a temp checkpoint folder of step >= min_step exists (a save is in flight)."""

    def check() -> bool:
        if not ckpts.is_dir():
            return False
        return any(n.startswith(".tmp-step-") and int(n[-6:]) >= min_step for n in os.listdir(ckpts))

    return check


def steps_logged(out: Path, at_least: int):
    def check() -> bool:
        path = out / "metrics.jsonl"
        return path.is_file() and len(path.read_text().splitlines()) >= at_least

    return check


def test_sigkill_during_save_and_between_steps_resumes_exactly(workspace, tmp_path):
    rng = random.Random(os.environ.get("RAINBOWPO_KILL_SEED", "0"))
    straight = tmp_path / "straight"
    launch(base_overrides(workspace, straight, **COMMON), nprocs=2)

    killed = tmp_path / "killed"
    over = base_overrides(workspace, killed, **COMMON)
    kill_when(start(over), saving(killed / "checkpoints", rng.randint(2, 4)))
    leftovers = [n for n in os.listdir(killed / "checkpoints") if n.startswith(".tmp-")]
    assert leftovers, "the kill was meant to land inside a save"
    kill_when(start(over), steps_logged(killed, rng.randint(5, 7)))
    proc = launch(over, nprocs=2)
    assert "resumed from" in proc.stdout

    steps = [r["step"] for r in read_metrics(killed)]
    assert steps == list(range(1, 9)), steps  # no duplicated or missing step after two resumes
    a, b = final_weights(straight), final_weights(killed)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    names = sorted(n for n in os.listdir(killed / "checkpoints") if n.startswith((".tmp", "step-")))
    assert names == ["step-000007", "step-000008"], names  # keep_last 2, no temp folder left


NAN = {"objective.preset": "dpo", "objective.mix_alpha": 0.0, "objective.beta": 3e38, "train.max_steps": 2,
       "output.save_every": 1}  # fmt: skip
"""Reference-free DPO with β = 3e38: β·(a log-prob difference above 1.2 nats) overflows to ±inf."""


def test_non_finite_loss_stop_names_step_rows_and_checkpoint(workspace, tmp_path):
    out = tmp_path / "stop"
    proc = launch(base_overrides(workspace, out, **NAN), check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "non-finite loss at the settings check before step 1 (rows [0, 1, 2, 3])" in message
    assert "Last good checkpoint: none" in message and "train.on_nan: skip_step" in message
    assert not (out / "checkpoints").exists() or not any(
        n.startswith("step-") for n in os.listdir(out / "checkpoints")
    )


def test_non_finite_skip_step_leaves_weights_untouched(workspace, tmp_path):
    out = tmp_path / "skip"
    launch(base_overrides(workspace, out, **NAN, **{"train.on_nan": "skip_step"}))
    rows = read_metrics(out)
    assert [r.get("skipped_nonfinite") for r in rows] == [1, 1]
    before = load_file(str(workspace / "model" / "model.safetensors"))
    after = final_weights(out)
    assert max((before[k] - after[k]).abs().max().item() for k in before) == 0.0
