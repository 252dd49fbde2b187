"""Atomic checkpoints without DeepSpeed: the save protocol of train.save with a stand-in policy engine.

Disk-full is simulated by a policy writer that fails half-way (ENOSPC), and by a failing torch.save."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from rainbowpo import checkpoint as ckpt
from rainbowpo import train


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


def fake_run(out, keep_last: int = 1):
    dist = SimpleNamespace(is_main=True, rank=0, world_size=1)
    cfg = SimpleNamespace(output=SimpleNamespace(keep_last=keep_last))
    return SimpleNamespace(state={"step": 0}, dist=dist, policy=FakePolicy(), cfg=cfg, total_steps=10)


def save_at(run, root, step: int) -> None:
    run.state["step"] = step
    train.save(run, str(root))


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
