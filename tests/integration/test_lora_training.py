"""LoRA training end to end on a tiny Llama (docs/recipes.md, "LoRA and QLoRA").

One process runs three trainings in a row (tests/integration/lora_probe.py), the 2-rank test a straight and
a SIGKILLed run:
- ZeRO-2, lr 1e-2: only adapter weights change; final/ (merged) and final_adapter/ both load and give the
  engine's log-probs; checkpoints hold the adapter and its optimizer state only.
- ZeRO-0 from that adapter: the reference is the starting adapter (= the policy at step 0, so rewards 0).
- reference.mode cached: the same losses as the online (adapter-off) reference.
- ZeRO-3 + gradient checkpointing, lr 0: rewards exactly 0 at every step; reference = the plain base model.
- 2 ranks, ZeRO-3 + gradient checkpointing: trains, and a kill -9 between steps + resume: auto ends with the
  same adapter as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, base_overrides, launch, read_metrics
from safetensors.torch import load_file
from test_reliability import kill_when, start, steps_logged

pytestmark = [pytest.mark.slow]

LORA = {"model.lora.r": 4, "model.lora.alpha": 8, "objective.preset": "dpo", "train.max_steps": 3,
        "train.epochs": 2}  # fmt: skip


def probe(cases: dict, tmp_path) -> None:
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/integration/lora_probe.py"), str(spec)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def report(out) -> dict:
    return json.loads((out / "probe.json").read_text())


def sequence_logp(model, tokenizer, workspace) -> torch.Tensor:
    """Log-probs of the first two training pairs, computed by our scorer around any HF model."""
    from rainbowpo.config import load_config
    from rainbowpo.data.tokenize import load_examples
    from rainbowpo.logprobs import SequenceScorer
    from rainbowpo.train import make_batch, resolve_defaults

    cfg = resolve_defaults(load_config(None, base_overrides(workspace, workspace / "unused")))
    examples = load_examples(cfg.data, cfg.data.train, tokenizer, "preference", 0)[0]
    batch = make_batch(cfg, tokenizer, examples[:2])
    with torch.no_grad():
        return SequenceScorer(model)(batch)[0]


def test_lora_trains_adapter_only_exports_and_references(workspace, tmp_path):
    trained, resumed, frozen = tmp_path / "zero2", tmp_path / "from_adapter", tmp_path / "lr0"
    cached = tmp_path / "cached"
    cases = {
        "zero2": {"overrides": base_overrides(workspace, trained, **LORA, **{"deepspeed.config": "zero2"})},
        "from_adapter": {"overrides": base_overrides(workspace, resumed, **{**LORA, "model.lora.r": 0},
                         **{"deepspeed.config": "zero0", "model.adapter_path": trained / "final_adapter",
                            "output.checkpoints": False})},  # fmt: skip
        "cached": {"overrides": base_overrides(workspace, cached, **LORA, **{"deepspeed.config": "zero2",
                   "reference.mode": "cached", "output.checkpoints": False, "output.export": False})},
        "lr0": {"lr0": True, "overrides": base_overrides(workspace, frozen, **LORA, **{
            "model.gradient_checkpointing": True, "output.checkpoints": False, "output.export": False})},
    }  # fmt: skip
    probe(cases, tmp_path)

    # ZeRO-2, lr 1e-2: the base is untouched, every adapter's B moved off zero, the policy changed
    r = report(trained)
    assert r["base_changed"] == [] and r["adapter_nonzero_B"] == 2 * 7
    assert r["policy_before"] == pytest.approx(r["base_logp"], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(r["policy_after"], r["base_logp"])) > 1e-3
    # both exports give the engine's log-probs after training
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained / "final")
    merged = AutoModelForCausalLM.from_pretrained(trained / "final", attn_implementation="sdpa")
    assert sequence_logp(merged, tok, workspace).tolist() == pytest.approx(r["policy_after"], abs=1e-4)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model", attn_implementation="sdpa")
    adapter = PeftModel.from_pretrained(base, trained / "final_adapter")
    assert sequence_logp(adapter, tok, workspace).tolist() == pytest.approx(r["policy_after"], abs=1e-4)
    # checkpoints: the adapter's weights and optimizer state, no base weight
    step = trained / "checkpoints" / "step-000003"
    (model_states,) = step.glob("*model_states.pt")
    states = torch.load(model_states, weights_only=False)
    assert states["module"] and all(".lora_" in k for k in states["module"])
    size = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    print(f"LoRA checkpoint {step.name}: {size / 1024:.0f} KiB "
          f"(base model {(workspace / 'model/model.safetensors').stat().st_size / 1024:.0f} KiB)")  # fmt: skip

    # from a trained adapter: reference = that adapter = the policy at step 0
    r = report(resumed)
    assert r["ref_logp"] == pytest.approx(r["policy_before"], abs=1e-6)
    assert r["ref_logp"] == pytest.approx(report(trained)["policy_after"], abs=1e-4)
    first = read_metrics(resumed)[0]
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert r["base_changed"] == []

    # reference.mode cached: one adapter-off pass, then the same run as the online reference's
    online_losses = [m["loss"] for m in read_metrics(trained)]
    assert [m["loss"] for m in read_metrics(cached)] == pytest.approx(online_losses, abs=1e-5)
    assert len(list((tmp_path / "ref_cache").iterdir())) == 1

    # lr 0 under ZeRO-3 + checkpointing: nothing moves, rewards exactly 0, reference = plain base model
    r = report(frozen)
    assert r["ref_logp"] == pytest.approx(r["base_logp"], abs=1e-6)
    metrics = read_metrics(frozen)
    assert len(metrics) == 3
    for rec in metrics:
        assert (
            rec["rewards/chosen"] == 0.0 and rec["rewards/rejected"] == 0.0 and rec["rewards/margins"] == 0.0
        )
        assert rec["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # -log σ(0)
    assert r["adapter_nonzero_B"] == 0 and r["policy_after"] == r["policy_before"]


def test_two_ranks_zero3_checkpointing_train_and_kill9_resume_exactly(workspace, tmp_path):
    common = {**LORA, "train.max_steps": 5, "train.epochs": 4, "model.gradient_checkpointing": True,
              "output.save_every": 1, "output.keep_last": 2}  # fmt: skip
    straight = tmp_path / "straight"
    launch(base_overrides(workspace, straight, **common), nprocs=2)
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["rewards/margins"] != 0.0  # the adapter moved

    killed = tmp_path / "killed"
    over = base_overrides(workspace, killed, **common)
    kill_when(start(over), steps_logged(killed, 3))
    launch(over, nprocs=2)
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3, 4, 5]
    a = load_file(str(straight / "final_adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "final_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for key in a:
        assert torch.equal(a[key], b[key]), key
