"""`launch/prep.sh --hostfile` (data_prep.pipeline under the deepspeed launcher): 2 ranks = 1 process."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT, free_port

from data_prep import pipeline
from data_prep.common import read_parts
from data_prep.tasks import sort_task
from rainbowpo.tiny import build_tiny_model, train_sentencepiece

FLAGS = ["--n", "4", "--max-new-tokens", "8", "--reward", "data_prep.tasks.sort_task:reward", "--method", "rso",
         "--k", "2", "--batch-prompts", "3", "--chunk", "3"]  # fmt: skip


@pytest.mark.slow
def test_pipeline_under_the_deepspeed_launcher_matches_one_process(tmp_path, monkeypatch):
    rows = sort_task.make_prompts(10, seed=0)
    texts = [r["prompt"] + " " + sort_task.solve(r) for r in sort_task.make_prompts(200, seed=1)]
    tok = train_sentencepiece(texts, str(tmp_path / "tok"))
    build_tiny_model(tok, str(tmp_path / "model"), hidden=32, layers=2)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"), *FLAGS]

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    pipeline.main([*common, "--out", str(tmp_path / "one")])

    (tmp_path / "hosts").write_text("localhost slots=2\n")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(free_port()),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }  # the no-ssh mode: no sshd here
    cmd = [
        "bash",
        "launch/prep.sh",
        "--hostfile",
        str(tmp_path / "hosts"),
        *common,
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert "generate: shard 0/2: 6 prompts" in proc.stdout and "generate: shard 1/2: 4 prompts" in proc.stdout
    assert proc.stdout.count("data prep summary") == 1  # rank 0 alone scores and selects
    one, two = (
        {r["id"]: r["candidates"] for r in read_parts(str(tmp_path / d / "candidates"))}
        for d in ("one", "two")
    )
    assert len(one) == 10 and one == two
    assert (tmp_path / "one" / "pairs.jsonl").read_text() == (tmp_path / "two" / "pairs.jsonl").read_text()
