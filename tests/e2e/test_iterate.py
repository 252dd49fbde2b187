"""`bash launch/iterate.sh CONFIG --rounds 2` on a random tiny Llama: two rounds, a SIGKILL in the middle of
round 2's generation, a resume that repeats nothing of round 1, fingerprints that tie each round's data and
training to the policy of the round before, and the report.

The reward is the answer's length in characters (capped): a random model's samples differ in it, so every
round selects pairs; the test is about the loop's bookkeeping, not about learning.

Wall time measured on the shared 2-core machine: 121 s at load average ~2–6; 266 s, 360 s and 409 s
under heavy load (load average 7–23). Most of it is waiting: each training launch JIT-loads DeepSpeed's CPU comm op, and with several
checkouts sharing ~/.cache/torch_extensions it was recompiled (~2 min per compile under that load); the
test's own CPU time is about a minute."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def length_reward(prompt, completion: str, metadata: dict) -> float:
    return min(len(completion), 32) / 32


def make_workspace(ws: Path) -> Path:
    """Tokenizer + random tiny Llama, 24 prep and 8 held-out sort prompts, the iterate config."""
    from data_prep.tasks import sort_task
    from rainbowpo.tiny import build_tiny_model, train_sentencepiece

    prep, heldout = sort_task.make_prompts(24, seed=1), sort_task.make_prompts(8, seed=2)
    tok = train_sentencepiece([r["prompt"] + " " + sort_task.solve(r) for r in prep], str(ws / "tok"), 64)
    build_tiny_model(tok, str(ws / "sft"), hidden=32, layers=2, heads=4, kv_heads=2, seed=0)
    for name, rows in (("prep", prep), ("heldout", heldout)):
        (ws / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"path": str(ws / "sft")},
        "iterate": {"rounds": 2, "reference": "initial"},
        "prep": {"prompts": str(ws / "prep.jsonl"), "n": 4, "max_new_tokens": 12, "chunk": 1,
                 "reward": "test_iterate:length_reward", "k": 4},
        "train": {"config": "configs/tiny/rainbowpo_tiny.yaml", "num_accelerators": 1, "overrides": {
            "train.max_steps": 2, "train.global_batch_pairs": 8, "train.micro_batch_pairs": 8,
            "deepspeed.config": "zero0", "reference.offload": False, "data.max_length": 48,
            "data.max_prompt_length": 24}},
        "eval": {"prompts": str(ws / "heldout.jsonl"), "max_new_tokens": 12, "samples": 2},
        "output": {"dir": str(ws / "run")},
    }  # fmt: skip
    path = ws / "iterate.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def command(config: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'e2e'}"}
    env.pop("RANK", None)
    return ["bash", "launch/iterate.sh", str(config), "--rounds", "2"], env


def kill_when(proc: subprocess.Popen, pattern: str, timeout: float = 600) -> list[str]:
    """SIGKILL the whole process group as soon as a file matches `pattern`; returns the files then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = glob.glob(pattern)
        if found:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return found
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before {pattern}:\n{proc.stdout.read()}"
            )
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {pattern} after {timeout} s")


def test_two_rounds_resume_after_kill_fingerprints_and_report(tmp_path):
    from data_prep.common import read_jsonl, read_parts
    from rainbowpo.fingerprint import model_fingerprint

    config = make_workspace(tmp_path)
    run = tmp_path / "run"
    cmd, env = command(config)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    kill_when(proc, str(run / "round-2" / "candidates" / "part-*.jsonl"))
    time.sleep(0.2)  # a part renamed into place just before the kill is counted below
    parts_before = {
        p: Path(p).read_bytes() for p in glob.glob(str(run / "round-2" / "candidates" / "part-*"))
    }
    assert 0 < len(parts_before) < 24 and not (run / "round-2" / "generate.DONE").exists()
    round1 = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(run / "round-1" / "**"), recursive=True)}
    assert (run / "round-1" / "DONE").exists()

    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "round 1: done earlier" in resumed.stdout and "round 2: resuming" in resumed.stdout
    assert {p: os.stat(p).st_mtime_ns for p in round1} == round1  # round 1 untouched: nothing redone
    assert all(Path(p).read_bytes() == data for p, data in parts_before.items())  # kept, not resampled
    assert resumed.stdout.count(": generate ") == 1  # only round 2 samples again

    sft, policy1, policy2 = tmp_path / "sft", run / "round-1/train/final", run / "round-2/train/final"
    fp = {m: model_fingerprint(str(m)) for m in (sft, policy1, policy2)}
    assert len(set(fp.values())) == 3
    for rnd, base in ((1, sft), (2, policy1)):  # round r: data from policy r−1, training starts at policy r−1
        folder = run / f"round-{rnd}"
        rows = read_parts(str(folder / "candidates"))
        assert sorted(r["id"] for r in rows) == sorted(
            r["id"] for r in read_jsonl(str(tmp_path / "prep.jsonl"))
        )
        assert {r["model_fingerprint"] for r in rows} == {fp[base]}
        assert {p["provenance"]["model_fingerprint"] for p in read_jsonl(str(folder / "pairs.jsonl"))} == {
            fp[base]
        }
        train_cfg = (folder / "train" / "config.yaml").read_text()
        assert f"path: {base}\n" in train_cfg and f"path: {sft}\n" in train_cfg.split("reference:")[1]
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["base_fingerprint"] == fp[base]
        assert summary["policy_fingerprint"] == fp[policy1 if rnd == 1 else policy2]
        metrics = [json.loads(x) for x in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
        assert all(m["lengths/chosen"] >= 1 and m["lengths/rejected"] >= 1 for m in metrics)

    report = (run / "report.md").read_text()
    assert all(f"| {r} | `{fp[m]}` |" in report for r, m in ((0, sft), (1, policy1), (2, policy2)))
    png = (run / "reward_by_round.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (
        again.returncode == 0 and "round 2: done earlier" in again.stdout and "generate " not in again.stdout
    )
