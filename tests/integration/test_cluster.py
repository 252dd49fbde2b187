"""What only a cluster does (docs/reliability.md, docs/distributed.md): another world size on resume, a dead
rank, a rank whose shards land elsewhere.

- Resume on another world size: ZeRO-2 and ZeRO-3, each one chain 2 ranks → SIGKILL after the step-2
  checkpoint → 1 rank → SIGKILL after the step-4 checkpoint → 2 ranks to step 6 (so 2→1 and 1→2 are both
  crossed, each through DeepSpeed's universal conversion). The final weights equal an uninterrupted 2-rank
  run to 1e-5 and metrics.jsonl has every step exactly once.
- A dead rank: two ranks started as two "nodes" (no launcher between them); rank 1 is SIGKILLed mid-run;
  rank 0 exits non-zero within train.dist_timeout_minutes with one line naming rank 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, base_overrides, final_weights, free_port, launch, read_metrics, train_command

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

CHAIN = {"train.epochs": 3, "train.max_steps": 6, "output.save_every": 2, "output.keep_last": 3,
         "objective.preset": "dpo"}  # fmt: skip


def start(overrides: list[str], nprocs: int) -> subprocess.Popen:
    """A training run in its own process group (one killpg takes the launcher and its ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.Popen(train_command(overrides, nprocs), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL the whole run as soon as the step-`step` checkpoint is COMPLETE."""
    marker = out / "checkpoints" / f"step-{step:06d}" / "COMPLETE"
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        assert proc.poll() is None, f"the run ended before the step-{step} checkpoint"
        assert time.monotonic() < deadline, "checkpoint never written"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_on_another_world_size_equals_uninterrupted_run(workspace, tmp_path, stage):
    straight = tmp_path / "straight"
    launch(base_overrides(workspace, straight, **CHAIN, **{"deepspeed.config": stage}), nprocs=2)

    out = tmp_path / "chain"
    over = base_overrides(workspace, out, **CHAIN, **{"deepspeed.config": stage})
    kill_after_checkpoint(start(over, 2), out, 2)
    kill_after_checkpoint(start(over, 1), out, 4)  # 2 → 1 ranks
    proc = launch(over, nprocs=2)  # 1 → 2 ranks
    assert "resumed from" in proc.stdout and "(universal conversion) at step 4" in proc.stdout

    assert (out / "checkpoints" / "step-000002" / "universal").is_dir()
    assert (out / "checkpoints" / "step-000004" / "universal").is_dir()
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, 7)), steps  # no step duplicated or lost
    a, b = final_weights(straight), final_weights(out)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst


def test_a_dead_rank_is_named_and_the_survivor_exits_non_zero(workspace, tmp_path):
    """Two ranks as two nodes (no common launcher): SIGKILL rank 1 after step 1; rank 0 must not hang."""
    out = tmp_path / "dead"
    over = base_overrides(workspace, out, **{"train.epochs": 50, "train.max_steps": 200, "objective.preset": "dpo",
                                             "deepspeed.config": "zero2", "train.dist_timeout_minutes": 0.5})  # fmt: skip
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "rainbowpo.train", *over], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert procs[0].poll() is None and time.monotonic() < deadline, "rank 0 never logged a step"
        time.sleep(0.01)
    procs[1].kill()
    killed_at = time.monotonic()
    text, _ = procs[0].communicate(timeout=120)
    waited = time.monotonic() - killed_at
    procs[1].wait()
    assert procs[0].returncode != 0
    lines = [line for line in text.splitlines() if "stopped responding" in line]
    assert lines and "rank 1 stopped responding" in lines[0], text[-3000:]
    assert waited < 0.5 * 60 + 30, waited  # within train.dist_timeout_minutes (plus exit)


def test_tiny_moe_trains_on_two_ranks_with_zero3(workspace, tmp_path):
    """Qwen2-MoE (4 experts, top-2) under ZeRO-3 on 2 ranks: expert blocks are leaf modules (no stall on
    experts one rank's tokens skip), the router aux loss is added with the model's own coefficient.
    Also output.export_every: an intermediate HF export after step 1."""
    from transformers import AutoTokenizer

    from rainbowpo.tiny import build_tiny_model

    moe = tmp_path / "moe"
    tok = AutoTokenizer.from_pretrained(str(workspace / "model"))
    build_tiny_model(tok, str(moe), arch="qwen2_moe", hidden=32, layers=2, heads=4, kv_heads=2, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                     decoder_sparse_step=1)  # fmt: skip
    out = tmp_path / "out"
    over = base_overrides(workspace, out, **{"model.path": str(moe), "train.max_steps": 2, "objective.preset": "dpo",
                                             "deepspeed.config": "zero3", "output.export_every": 1})  # fmt: skip
    proc = launch(over, nprocs=2, timeout=600)
    assert "router aux loss coefficient 0.001 | ZeRO-3 leaf modules ['Qwen2MoeSparseMoeBlock']" in proc.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 < r["router_aux_loss"] < 10 and r["loss"] == r["loss"] for r in rows), rows
    from safetensors.torch import load_file  # the export differs from the initial weights: trained

    start, end = load_file(str(moe / "model.safetensors")), final_weights(out)
    gate = next(k for k in start if k.endswith("mlp.gate.weight"))
    assert (start[gate] - end[gate]).abs().max() > 0, "the router was not trained"
    assert sorted(os.listdir(out / "exports")) == ["step-000001"]  # output.export_every 1; step 2 is final/
    mid = load_file(str(out / "exports" / "step-000001" / "model.safetensors"))
    assert 0 < (mid[gate] - start[gate]).abs().max() and (mid[gate] - end[gate]).abs().max() > 0


def test_wandb_offline_logs_the_config_and_a_resumed_run_continues_the_same_run(workspace, tmp_path):
    """WANDB_MODE=offline: the run id is saved in each checkpoint; SIGKILL after the step-2 checkpoint and
    the resumed process logs into the same W&B run (same id), with the resolved config."""
    pytest.importorskip("wandb")
    os.environ["WANDB_MODE"] = "offline"
    out = tmp_path / "wb"
    over = base_overrides(workspace, out, **{"train.epochs": 2, "train.max_steps": 4, "output.save_every": 2,
                                             "objective.preset": "dpo", "logging.wandb": True,
                                             "deepspeed.config": "zero2"})  # fmt: skip
    try:
        kill_after_checkpoint(start(over, 1), out, 2)
        launch(over, nprocs=1)
    finally:
        del os.environ["WANDB_MODE"]
    from rainbowpo.checkpoint import read_trainer_state

    run_id = read_trainer_state(str(out / "checkpoints" / "step-000002"))["wandb_id"]
    assert read_trainer_state(str(out / "checkpoints" / "step-000004"))["wandb_id"] == run_id
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs
    record = (out / "wandb" / runs[-1] / f"run-{run_id}.wandb").read_bytes()  # offline: config in the log
    assert b"dist_timeout_minutes" in record and b"global_batch_pairs" in record
