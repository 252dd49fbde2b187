"""One training run for benchmarks/gpu_check.py, in its own process: throughput and peak memory.

    python benchmarks/gpu_train_probe.py [CONFIG.yaml] key=value ...

Runs `rainbowpo.train.train` (the real loop, DeepSpeed engine included) and prints one line
`GPU_PROBE {"tokens_per_second": ..., "peak_gib": ..., "steps": ...}`: tokens/s is the median over the
steps after the first (warm-up: kernel autotuning, allocator growth), peak memory is the CUDA allocator's
high-water mark on a GPU, else the process's maximum RSS.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rainbowpo import engine  # noqa: E402
from rainbowpo.config import load_config  # noqa: E402
from rainbowpo.metrics import read_metrics  # noqa: E402
from rainbowpo.train import parse_args, train  # noqa: E402


def peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str]) -> None:
    cfg = load_config(*parse_args(argv))
    train(cfg)
    rates = [r["tokens_per_second"] for r in read_metrics(os.path.join(cfg.output.dir, "metrics.jsonl"))
             if "tokens_per_second" in r]  # fmt: skip
    steady = rates[1:] or rates
    result = {"tokens_per_second": statistics.median(steady), "peak_gib": peak_gib(), "steps": len(rates)}
    engine.shutdown()
    print("GPU_PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
