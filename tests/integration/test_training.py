"""The DeepSpeed loop on CPU (gloo) with a tiny random Llama: overfit, data-parallel equivalence,
ZeRO-3 partitioning, reference modes, resume, export. Each launch checks several things (CPU time)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, final_weights, launch, read_metrics

pytestmark = [pytest.mark.slow]


def assert_same_weights(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, f"max parameter difference {worst:.3g} > {tol}"


def test_overfit_dpo_and_rainbowpo(workspace, tmp_path):
    """8 pairs, online reference: the loss falls and the preference accuracy reaches 1.

    A random reference predicts near-uniform tokens: h ≈ 1, so Mallows' φ = −0.29·ln h ≈ 3e-4 and the
    rainbowpo preset needs β ≈ 3000 for β·φ ≈ 1 (a trained reference has h well below 1)."""
    for preset, beta in (("dpo", 0.5), ("rainbowpo", 3000.0)):
        out = tmp_path / preset
        over = base_overrides(workspace, out, **{"data.train": workspace / "pairs8.jsonl", "objective.preset": preset,
                              "objective.beta": beta, "train.max_steps": 30, "train.epochs": 30,
                              "deepspeed.config": "zero0", "output.export": False})  # fmt: skip
        launch(over)
        rows = read_metrics(out)
        assert len(rows) == 30 and [r["step"] for r in rows] == list(range(1, 31))
        assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], (preset, rows[0]["loss"], rows[-1]["loss"])
        assert rows[-1]["rewards/accuracies"] == 1.0
        expected_keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                         "logps/chosen", "logps/rejected", "phi/mean", "lr", "grad_norm", "tokens_per_second",
                         "epoch", "step"}  # fmt: skip
        assert expected_keys <= rows[0].keys()
        assert (rows[0]["phi/mean"] == 1.0) == (preset == "dpo")


def _shm_allreduce_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_data_parallel_zero3_matches_single_rank_and_split(workspace, tmp_path):
    """2 ranks ZeRO-3 (micro 2 × accum 2) == 1 rank ZeRO-0 (micro 8 × accum 1) == token-budget split."""
    common = {"train.max_steps": 3, "train.epochs": 2, "objective.preset": "rainbowpo"}
    single = tmp_path / "single"
    launch(
        base_overrides(
            workspace, single, **common, **{"deepspeed.config": "zero0", "train.micro_batch_pairs": 8}
        )
    )
    dp = tmp_path / "dp"
    shm_before = _shm_allreduce_buffers()
    proc = launch(base_overrides(workspace, dp, **common, **{"train.micro_batch_pairs": 2}), nprocs=2)
    assert "world size 2" in proc.stdout and "accumulation 2" in proc.stdout and "ZeRO stage 3" in proc.stdout
    assert _shm_allreduce_buffers() <= shm_before, "DeepSpeed's /dev/shm buffers leaked"
    budget = tmp_path / "budget"
    proc = launch(base_overrides(workspace, budget, **common, **{"train.micro_batch_tokens": 120}), nprocs=2)
    accum = int(re.search(r"accumulation (\d+)", proc.stdout).group(1))
    assert accum >= 2, "the token budget should split each rank's share into several micro-batches"
    w_single = final_weights(single)
    assert_same_weights(w_single, final_weights(dp), 1e-5)
    assert_same_weights(w_single, final_weights(budget), 1e-5)
    loss_single = [r["loss"] for r in read_metrics(single)]
    loss_dp = [r["loss"] for r in read_metrics(dp)]
    assert loss_single == pytest.approx(loss_dp, abs=1e-5)


def test_resume_equals_straight_run_and_skips_unmarked(workspace, tmp_path):
    """6 steps straight == 3 steps + resume 3 more; a checkpoint without its marker is ignored."""
    common = {"train.epochs": 3, "output.save_every": 3, "objective.preset": "dpo"}
    straight = tmp_path / "straight"
    launch(base_overrides(workspace, straight, **common, **{"train.max_steps": 6}), nprocs=2)
    parted = tmp_path / "parted"
    launch(
        base_overrides(workspace, parted, **common, **{"train.max_steps": 3, "output.export": False}),
        nprocs=2,
    )
    ckpts = parted / "checkpoints"
    assert (ckpts / "step-000003" / "COMPLETE").is_file()
    fake = ckpts / "step-000005"  # a newer folder without COMPLETE must not be picked
    shutil.copytree(ckpts / "step-000003", fake)
    (fake / "COMPLETE").unlink()
    proc = launch(base_overrides(workspace, parted, **common, **{"train.max_steps": 6}), nprocs=2)
    assert "resumed from" in proc.stdout and "step-000003" in proc.stdout
    rows = read_metrics(parted)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_same_weights(final_weights(straight), final_weights(parted), 1e-6)
    state = json.loads((ckpts / "step-000006" / "trainer_state.json").read_text())
    assert state["step"] == 6


def test_reference_cached_equals_online_and_none_loads_nothing(workspace, tmp_path):
    # eval pairs (pairs8) differ from the training pairs: a cached reference must score them with their
    # own numbers, not training pair i's (the cache keys rows by (split, row))
    common = {"train.max_steps": 2, "objective.preset": "rainbowpo", "output.export": False,
              "data.eval": str(workspace / "pairs8.jsonl"), "train.eval_every": 1}  # fmt: skip
    online, cached = tmp_path / "online", tmp_path / "cached"
    launch(base_overrides(workspace, online, **common))
    launch(base_overrides(workspace, cached, **common, **{"reference.mode": "cached"}))
    rows_online, rows_cached = read_metrics(online), read_metrics(cached)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "phi/mean"):
        assert [r[key] for r in rows_online if key in r] == pytest.approx(
            [r[key] for r in rows_cached if key in r], abs=1e-5
        ), key
        evals = [
            [r["eval/" + key] for r in rows if "eval/" + key in r] for rows in (rows_online, rows_cached)
        ]
        assert len(evals[0]) >= 2 and evals[0] == pytest.approx(evals[1], abs=1e-5), "eval/" + key
    cache_dirs = list((tmp_path / "ref_cache").iterdir())
    assert len(cache_dirs) == 1 and (cache_dirs[0] / "COMPLETE").is_file()
    proc = launch(
        base_overrides(workspace, cached, **common, **{"reference.mode": "cached", "output.resume": "never"})
    )
    assert "reference cache" not in proc.stderr  # reused: no second pass
    none = tmp_path / "none"
    proc = launch(base_overrides(workspace, none, **{**common, "objective.preset": "simpo"}))
    assert "reference none" in proc.stdout


def test_zero3_partitions_and_export_matches_engine(workspace, tmp_path):
    """On 2 ranks each holds about half the parameters (policy and offloaded reference); the exported
    folder loads with AutoModelForCausalLM and gives the engine's log-probs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT, free_port
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rainbowpo import train as trainer
    from rainbowpo.attention import select_attention
    from rainbowpo.config import load_config
    from rainbowpo.data.tokenize import load_examples
    from rainbowpo.logprobs import SequenceScorer

    out = tmp_path / "probe"
    over = base_overrides(workspace, out, **{"objective.preset": "dpo", "reference.offload": True})
    ds = str(Path(sys.executable).parent / "deepspeed")
    cmd = [
        ds,
        "--num_accelerators",
        "2",
        "--master_port",
        str(free_port()),
        "tests/integration/probe_engines.py",
        *over,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    reports = [json.loads((out / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        for key in ("policy", "reference"):
            assert abs(r[key] - r["total"] / 2) <= 0.05 * r["total"], (key, r[key], r["total"])
    cfg = load_config(None, over)
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    attn = select_attention(cfg.model.attn_implementation, cfg.data.packing, cfg.data.share_prompt)
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"), attn_implementation=attn)
    examples, _ = load_examples(cfg.data, cfg.data.train, tok, "preference", cfg.train.seed)
    with torch.no_grad():
        logp, _ = SequenceScorer(model)(trainer.make_batch(cfg, tok, examples[:2]))
    assert logp.tolist() == pytest.approx(reports[0]["logp"], abs=1e-5)


def test_two_simulated_nodes_match_single_node(workspace, tmp_path):
    """A hostfile with two 1-slot nodes, two launchers (--no_ssh, --node_rank 0|1) on this machine."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT, free_port

    common = {"train.max_steps": 2, "objective.preset": "dpo", "train.micro_batch_pairs": 2}
    single = tmp_path / "single"
    launch(base_overrides(workspace, single, **common, **{"deepspeed.config": "zero0"}))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "two_nodes"
    ds, port = str(Path(sys.executable).parent / "deepspeed"), str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([ds, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr",
                          "127.0.0.1", "--master_port", port, "--module", "rainbowpo.train",
                          *base_overrides(workspace, out, **common)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "world size 2" in outputs[0][0]
    assert_same_weights(final_weights(single), final_weights(out), 1e-5)
