"""generate → score → select on a tiny random model: 2 processes, kill -9 + resume, scorers, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from data_prep import generate, score, select
from data_prep.common import read_parts
from data_prep.tasks import sort_task
from rainbowpo.tiny import build_tiny_model, train_sentencepiece

REWARD = "data_prep.tasks.sort_task:reward"


@pytest.fixture(scope="module")
def prep_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("prep")
    rows = sort_task.make_prompts(12, seed=0)
    texts = [r["prompt"] + " " + sort_task.solve(r) for r in sort_task.make_prompts(200, seed=1)]
    tok = train_sentencepiece(texts, str(ws / "tok"))
    build_tiny_model(tok, str(ws / "model"), hidden=32, layers=2)
    (ws / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws


def run_pipeline(ws, out, *extra):
    cmd = [sys.executable, "-m", "data_prep.pipeline", "--model", str(ws / "model"), "--prompts",
           str(ws / "prompts.jsonl"), "--out", str(out), "--n", "4", "--max-new-tokens", "8", "--reward", REWARD,
           "--method", "best_worst", "--chunk", "2", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pipeline_two_processes_matches_one(prep_ws, tmp_path):
    one, two = (
        run_pipeline(prep_ws, tmp_path / "one"),
        run_pipeline(prep_ws, tmp_path / "two", "--procs", "2"),
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-3000:] + two.stderr[-3000:]
    rows_one = {r["id"]: r["candidates"] for r in read_parts(str(tmp_path / "one" / "candidates"))}
    rows_two = {r["id"]: r["candidates"] for r in read_parts(str(tmp_path / "two" / "candidates"))}
    assert len(rows_one) == 12 and rows_one == rows_two  # per-prompt seeds: sharding does not matter
    pairs = [json.loads(line) for line in open(tmp_path / "two" / "pairs.jsonl")]
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "provenance"}
        assert p["provenance"]["rewards"][0] > p["provenance"]["rewards"][1]
        assert p["provenance"]["sampler"]["n"] == 4 and p["provenance"]["model_fingerprint"]
    assert "data prep summary" in two.stdout


@pytest.mark.slow
def test_generation_killed_mid_way_resumes_exactly_once(prep_ws, tmp_path):
    out = tmp_path / "cands"  # one prompt per engine call and per part file, so the kill lands mid-way
    cmd = [sys.executable, "-m", "data_prep.generate", "--model", str(prep_ws / "model"), "--prompts",
           str(prep_ws / "prompts.jsonl"), "--out", str(out), "--n", "4", "--max-new-tokens", "48", "--chunk", "1",
           "--batch-prompts", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("part-*.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_parts(str(out)))
    assert 0 < partial < 12, partial
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    ids = [r["id"] for r in read_parts(str(out))]
    assert sorted(ids) == sorted(r["id"] for r in sort_task.make_prompts(12, seed=0))  # each exactly once


def test_function_scorer_and_errors(prep_ws, tmp_path):
    rows = [{"id": "a", "prompt": "sort: 2 1", "metadata": {"numbers": [2, 1]}, "candidates": ["1 2", "2 1"]}]
    from data_prep.common import write_part

    write_part(str(tmp_path / "c"), "0", rows)
    score.score(str(tmp_path / "c"), str(tmp_path / "s"), score.make_scorer(REWARD, None))
    assert read_parts(str(tmp_path / "s"))[0]["rewards"] == [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot import"):
        score.make_scorer("no_such_module:fn", None)
    with pytest.raises(ValueError, match="has no function"):
        score.make_scorer("data_prep.tasks.sort_task:nope", None)
    with pytest.raises(ValueError, match="module:function"):
        score.make_scorer("just_a_name", None)
    nan_scorer = score.FunctionScorer(REWARD)
    nan_scorer.fn = lambda p, c, m: float("nan")
    with pytest.raises(ValueError, match="prompt id a candidate 0"):
        nan_scorer(rows[0])
    raising = score.FunctionScorer(REWARD)
    raising.fn = lambda p, c, m: 1 / 0
    with pytest.raises(ValueError, match="raised on prompt id a candidate 0"):
        raising(rows[0])


def test_reward_model_scorer(prep_ws, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(prep_ws / "model"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    scorer = score.make_scorer(None, str(tmp_path / "rm"))
    row = {"id": "a", "prompt": "sort: 2 1", "candidates": ["1 2", "2 1", "1 2"]}
    rewards = scorer(row)
    assert (
        len(rewards) == 3 and rewards[0] == pytest.approx(rewards[2], abs=1e-5) and rewards[0] != rewards[1]
    )


def test_vllm_engine_reports_missing_install(prep_ws):
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    args = generate.parser().parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--engine", "vllm"])
    with pytest.raises((ValueError, SystemExit), match="vllm"):  # one line, before any model is loaded
        generate.make_engine(str(prep_ws / "model"), generate.sampler_settings(args), args, "cpu")


def test_select_requires_scored_rows(tmp_path):
    with pytest.raises(ValueError, match="run data_prep.score first"):
        select.select(str(tmp_path / "empty"), str(tmp_path / "p.jsonl"), "rso", 4, 0.5, 0.0, 0)
