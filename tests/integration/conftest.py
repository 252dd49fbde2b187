"""A tiny workspace (tokenizer, random Llama, preference pairs) and a launcher for training runs."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORDS = "alpha beta gamma delta one two three four red green blue sort list answer yes no".split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = _sentence(rng, rng.randint(3, 8))
            chosen = _sentence(rng, rng.randint(2, 7))
            rejected = _sentence(rng, rng.randint(2, 7))
            if rejected == chosen:
                rejected += " no"
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """tok+model in ws/model, 16 pairs in ws/pairs.jsonl, 8 in ws/pairs8.jsonl."""
    from rainbowpo.tiny import build_tiny_model, train_sentencepiece

    ws = tmp_path_factory.mktemp("ws")
    rng = random.Random(1)
    tok = train_sentencepiece([_sentence(rng, 10) for _ in range(400)], str(ws / "tok"), vocab_size=120)
    build_tiny_model(tok, str(ws / "model"), arch="llama", hidden=32, layers=2, heads=4, kv_heads=2, seed=0)
    write_pairs(ws / "pairs.jsonl", 16, seed=0)
    write_pairs(ws / "pairs8.jsonl", 8, seed=1)
    return ws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(ws: Path, out: Path, **extra) -> list[str]:
    items = {
        "model.path": str(ws / "model"),
        "data.train": str(ws / "pairs.jsonl"),
        "data.max_length": 64,
        "data.max_prompt_length": 32,
        "train.global_batch_pairs": 8,
        "train.micro_batch_pairs": 4,
        "train.lr": 1e-3,
        "train.warmup_ratio": 0.0,
        "train.lr_schedule": "constant",
        "train.seed": 0,
        "deepspeed.config": "zero3",
        "output.dir": str(out),
        "logging.progress": False,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def train_command(overrides: list[str], nprocs: int) -> list[str]:
    """`python -m rainbowpo.train` (1 process) or `deepspeed --num_accelerators N --module rainbowpo.train`."""
    if nprocs == 1:
        return [sys.executable, "-m", "rainbowpo.train", *overrides]
    ds = str(Path(sys.executable).parent / "deepspeed")
    return [ds, "--num_accelerators", str(nprocs), "--master_port", str(free_port()), "--module",
            "rainbowpo.train", *overrides]  # fmt: skip


def launch(overrides: list[str], nprocs: int = 1, timeout: int = 400, check: bool = True):
    """A training run (train_command) to its end; its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    cmd = train_command(overrides, nprocs)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(out: Path) -> list[dict]:
    from rainbowpo.metrics import read_metrics as _read

    return _read(str(out / "metrics.jsonl"))


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))
