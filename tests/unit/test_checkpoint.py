"""Atomic checkpoints without DeepSpeed: the save protocol of checkpoint.save with a stand-in policy engine.

Disk-full is simulated by a policy writer that fails half-way (ENOSPC), and by a failing torch.save."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from rainbowpo import checkpoint as ckpt


class FakePolicy:
    """Writes one shard file into root/tag like DeepSpeed's save_checkpoint; can fail half-way."""

    def __init__(self):
        self.fail = False

    def save(self, root: str, tag: str) -> None:
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "shard.pt"), "w") as f:
            f.write("half of a shard")
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")

    def param_checksum(self) -> list[float]:
        return [1.5, 2.25]


def fake_run(out, keep_last: int = 1, world_size: int = 1):
    dist = SimpleNamespace(is_main=True, rank=0, world_size=world_size)
    cfg = SimpleNamespace(output=SimpleNamespace(keep_last=keep_last))
    return SimpleNamespace(state={"step": 0}, dist=dist, policy=FakePolicy(), cfg=cfg, total_steps=10)


def save_at(run, root, step: int) -> None:
    run.state["step"] = step
    ckpt.save(run, str(root))


def test_save_is_complete_and_keep_last_keeps_the_newest(tmp_path):
    run, root = fake_run(tmp_path, keep_last=2), tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_at(run, root, step)
    assert sorted(os.listdir(root)) == ["step-000002", "step-000003"]
    for name in os.listdir(root):
        assert {"shard.pt", "trainer_state.json", "COMPLETE", "rng"} <= set(os.listdir(root / name))
    assert ckpt.resolve_resume("auto", str(root)) == str(root / "step-000003")
    assert ckpt.read_trainer_state(str(root / "step-000003"))["step"] == 3


def test_disk_full_during_shard_write_keeps_previous_checkpoint(tmp_path):
    run, root = fake_run(tmp_path), tmp_path / "checkpoints"
    save_at(run, root, 4)
    run.policy.fail = True
    with pytest.raises(ckpt.CheckpointError) as info:
        save_at(run, root, 5)
    message = str(info.value)
    assert "saving the step-5 checkpoint failed ([Errno 28] No space left on device)" in message
    assert f"{root / 'step-000004'} is intact and output.resume: auto continues from it" in message
    assert "\n" not in message
    assert ckpt.resolve_resume("auto", str(root)) == str(root / "step-000004")  # never the partial one
    assert sorted(os.listdir(root)) == [".tmp-step-000005", "step-000004"]
    assert ckpt.read_trainer_state(str(root / "step-000004"))["step"] == 4
    run.policy.fail = False  # space freed: the next save replaces the stale temp folder
    save_at(run, root, 5)
    assert sorted(os.listdir(root)) == ["step-000005"]


def test_disk_full_while_writing_rng_state(tmp_path, monkeypatch):
    run, root = fake_run(tmp_path), tmp_path / "checkpoints"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(
        ckpt.CheckpointError, match="there is no earlier checkpoint; free disk space and restart"
    ):
        save_at(run, root, 1)
    assert ckpt.resolve_resume("auto", str(root)) is None


def test_keep_last_never_deletes_the_only_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000003").mkdir(parents=True)
    (root / "step-000003" / "COMPLETE").write_text("{}")
    (root / "step-000009").mkdir()  # newer but incomplete: does not count
    ckpt.prune(str(root), keep_last=1)
    assert (root / "step-000003" / "COMPLETE").is_file()
    assert ckpt.resolve_resume("auto", str(root)) == str(root / "step-000003")


def test_a_rank_whose_shards_are_elsewhere_blocks_complete(tmp_path):
    """Two "nodes" with node-local output.dir: rank 0 sees only its own done marker, so no COMPLETE."""
    run, root = fake_run(tmp_path, world_size=2), tmp_path / "checkpoints"
    with pytest.raises(ckpt.CheckpointError) as info:
        save_at(run, root, 3)
    message = str(info.value)
    assert "the shards of rank(s) [1] of 2 are not there" in message
    assert "output.dir must be shared by all nodes" in message and "\n" not in message
    assert ckpt.resolve_resume("auto", str(root)) is None
    assert sorted(os.listdir(root / ".tmp-step-000003" / "done")) == ["rank0"]
    (root / ".tmp-step-000003" / "done" / "rank1").write_text("ok")  # the shared filesystem case
    assert ckpt.missing_ranks(str(root / ".tmp-step-000003"), 2) == []


def test_state_records_world_size_and_checksum_and_plan_flags_another_world_size(tmp_path):
    run, root = fake_run(tmp_path), tmp_path / "checkpoints"
    save_at(run, root, 2)
    state = ckpt.read_trainer_state(str(root / "step-000002"))
    assert state["world_size"] == 1 and state["param_checksum"] == [1.5, 2.25]
    assert ckpt.plan_resume("auto", str(root), world_size=1).universal is False
    plan = ckpt.plan_resume("auto", str(root), world_size=2)
    assert plan.universal is True and plan.folder == str(root / "step-000002")


def test_checksum_mismatch_after_load_stops_with_the_numbers(tmp_path):
    plan = ckpt.Resume(str(tmp_path / "step-000004"), {"step": 4, "world_size": 2, "param_checksum": [1.0, 2.0]},
                       universal=True)  # fmt: skip
    ckpt.verify_checksum(plan, [1.0 + 1e-9, 2.0])  # rounding of another reduction order passes
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify_checksum(plan, [0.5, 2.0])  # e.g. weights of a fresh start
    message = str(info.value)
    assert "do not match the saved ones" in message and "[1.0, 2.0]" in message and "[0.5, 2.0]" in message
    assert "resume on 2 ranks" in message


def test_lost_rank_messages_name_the_rank():
    from rainbowpo.engine import is_comm_failure, lost_ranks_message

    text = "[../monitored_barrier.cpp] Ranks 1, 3 failed to pass monitoredBarrier in 30000 ms"
    assert lost_ranks_message(text).startswith("ranks 1, 3 stopped responding (died or hung), seen by rank 0")
    message = lost_ranks_message("Connection closed by peer [10.0.0.2]:4242", missing=[1])
    assert message.startswith("rank 1 stopped responding") and "output.resume: auto" in message
    assert "\n" not in message
    assert is_comm_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert not is_comm_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
