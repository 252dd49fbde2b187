"""Every shipped config loads and validates; overrides, types, ranges and messages."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from rainbowpo.config import ConfigError, load_config
from rainbowpo.engine import assemble_ds_config, load_ds_preset

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ["model.path=/m", "data.train=p.jsonl"]


TRAIN_CONFIGS = [
    p for p in (ROOT / "configs").rglob("*.yaml") if "iterate" not in p.parts
]  # iterate: its own tree


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in TRAIN_CONFIGS))
def test_shipped_yaml_configs_validate(path):
    cfg = load_config(str(ROOT / path))
    assert cfg.model.path and cfg.data.train
    cfg.objective.build()


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_ds_presets_hold_zero_knobs_only(path):
    raw = json.loads(path.read_text())
    assert set(raw) <= {"_comment", "zero_optimization"}
    assert "auto" not in path.read_text()
    preset = load_ds_preset(path.stem)
    cfg = load_config(None, BASE + ["train.global_batch_pairs=8", "train.micro_batch_pairs=2"])
    ds = assemble_ds_config(preset, cfg.train, "bf16", 2, cfg.train.grad_accum(2))
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"]


def test_overrides_are_typed():
    cfg = load_config(None, BASE + ["train.lr=1e-6", "data.packing=false", "objective.beta=5",
                                    "train.adam_betas=[0.9, 0.99]", "objective.preset=simpo"])  # fmt: skip
    assert cfg.train.lr == 1e-6 and cfg.data.packing is False and cfg.objective.build().beta == 5.0
    assert cfg.train.adam_betas == (0.9, 0.99) and cfg.reference_mode() == "none"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "did you mean train.lr"),
        (["objectiv.beta=1"], "did you mean objective"),
        (["train.epochs=one"], "train.epochs: expected int"),
        (["model.dtype=bf61"], "did you mean bf16"),
        (["train.lr=0"], "train.lr"),
        (["train.warmup_ratio=1"], "train.warmup_ratio"),
        (["output.keep_last=0"], "output.keep_last"),
        (["data.max_prompt_length=4096"], "data.max_prompt_length"),
        (["data.share_prompt=true", "data.packing=false"], "data.share_prompt"),
        (["objective.beta=-1"], "objective.beta"),
        (["objective.preset=kto"], "objective.preset"),
        (["reference.mode=none"], "mix_alpha"),
        (
            ["reference.mode=none", "objective.preset=mallows_dpo", "objective.mix_alpha=0"],
            "contextual_scaling",
        ),
        (["train"], "expected key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, BASE + overrides)


def test_missing_model_path_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        load_config(None, ["data.train=p.jsonl"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n data: [\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_reference_mode_resolution_and_grad_accum():
    assert load_config(None, BASE).reference_mode() == "online"
    assert load_config(None, BASE + ["objective.preset=simpo"]).reference_mode() == "none"
    assert load_config(None, BASE + ["train.mode=sft"]).reference_mode() == "none"
    cfg = load_config(None, BASE + ["train.global_batch_pairs=64", "train.micro_batch_pairs=4"])
    assert cfg.train.grad_accum(2) == 8
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        cfg.train.grad_accum(3)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "paper" / "rainbowpo_llama3_8b.yaml"))
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_ds_config_conflicts_and_auto():
    cfg = load_config(None, BASE + ["train.global_batch_pairs=8", "train.micro_batch_pairs=2"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        assemble_ds_config({"train_micro_batch_size_per_gpu": 4}, cfg.train, "fp32", 1, 4)
    with pytest.raises(ConfigError, match="'auto'"):
        assemble_ds_config(
            {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, cfg.train, "fp32", 1, 4
        )
    with pytest.raises(ConfigError, match="optimizer"):
        assemble_ds_config({"optimizer": {"type": "AdamW"}}, cfg.train, "fp32", 1, 4)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_ds_preset("zero9")


def test_config_imports_without_torch():
    code = "import sys, rainbowpo.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_paper_config_matches_the_official_optimizer_and_schedule():
    """hanyang1999/RainbowPO examples/scripts/dpo_zero3.py: TRL's AdamW defaults (β 0.9/0.999, no weight
    decay, clip 1.0) and a forced cosine schedule; 8 ranks × micro 1 give 256 pairs per step."""
    cfg = load_config(str(ROOT / "configs" / "paper" / "rainbowpo_llama3_8b.yaml"))
    assert cfg.train.adam_betas == (0.9, 0.999) and cfg.train.lr_schedule == "cosine"
    assert cfg.train.weight_decay == 0.0 and cfg.train.max_grad_norm == 1.0
    assert cfg.train.grad_accum(8) == 32 and cfg.train.global_batch_pairs == 256
