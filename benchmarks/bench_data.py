"""Data set-up with 2 local ranks: the tokenize-once cache vs. today's per-rank loop vs. TRL's DPOTrainer.

    python ../shared/bench/make_workload.py --pairs 100000 --out runs/bench/wl100k
    python benchmarks/bench_data.py --workload runs/bench/wl100k [--num-proc 2] [--baseline 36ea1b1]

Each row is a fresh set of processes (imports and tokenizer load not timed), on the workload's
train.jsonl with max_length 512, max_prompt_length 256:

- `today`: the tokenize path of commit --baseline (before the cache: every rank reads and tokenizes
  every row into Python lists), extracted with `git archive`; 2 ranks at once.
- `first run`: this code, empty data.cache_dir and empty datasets cache: local rank 0 tokenizes with
  `datasets.map` (--num-proc workers) while local rank 1 waits, then both memory-map the arrays.
- `cached`: the same again — the key matches, both ranks map the arrays.
- `TRL`: `DPOTrainer._prepare_dataset` (trl's own tokenize step, `dataset_num_proc` = --num-proc) on
  the same rows after `load_dataset("json")`, empty datasets cache; one process (what its main process
  does before the others read datasets' cache).

Set-up seconds = wall time of the data call; for 2 ranks, the slower rank. Data RSS = the process's
resident memory after the data call minus before it (MiB), and after reading every row once (as an
epoch does: memory-mapped pages become resident, shared by the ranks through the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["data.max_length=512", "data.max_prompt_length=256"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    """One rank: load the tokenizer, time the data call, report JSON on the last line of stdout."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(args.workload, "tokenizer"))
    rows_file = os.path.join(args.workload, "train.jsonl")
    if args.worker == "trl":
        import datasets
        from trl import DPOConfig, DPOTrainer

        dpo_args = DPOConfig(
            output_dir=tempfile.mkdtemp(),
            dataset_num_proc=args.num_proc,
            max_length=512,
            use_cpu=True,
            bf16=False,
        )
        before, clock = rss_mib(), time.perf_counter()
        table = datasets.load_dataset("json", data_files=rows_file, split="train")
        shell = type("Shell", (), {"_tokenizer": tok})()
        data = DPOTrainer._prepare_dataset(shell, table, tok, dpo_args, "train")
        seconds, after = time.perf_counter() - clock, rss_mib()
        for i in range(len(data)):  # what its collator reads over an epoch
            data[i]
        touched = rss_mib()
    else:
        from rainbowpo.config import load_config
        from rainbowpo.data.tokenize import load_examples

        over = ["model.path=x", f"data.train={rows_file}", *SETTINGS]
        if args.worker != "today":
            over += [f"data.cache_dir={args.cache_dir}", f"data.num_proc={args.num_proc}"]
        cfg = load_config(None, over)
        before, clock = rss_mib(), time.perf_counter()
        data, _ = load_examples(cfg.data, cfg.data.train, tok, "preference", 0)
        seconds, after = time.perf_counter() - clock, rss_mib()
        for i in range(len(data)):
            data[i]
        touched = rss_mib()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_mib": after - before,
                "touched_mib": touched - before,
                "rows": len(data),
            }
        )
    )


def run_ranks(variant: str, args, env: dict, ranks: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", variant, "--workload", str(args.workload),
           "--num-proc", str(args.num_proc), "--cache-dir", str(args.cache_dir)]  # fmt: skip
    procs = []
    for rank in range(ranks):
        rank_env = {**env, "LOCAL_RANK": str(rank)} if ranks > 1 else env  # accelerate (TRL) reads more
        procs.append(
            subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        )
    out = []
    for p in procs:
        text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(
                f"{variant}: a rank failed (exit {p.returncode}); rerun the worker by hand to see why"
            )
        out.append(json.loads(text.strip().splitlines()[-1]))
    return out


def baseline_tree(rev: str, into: Path) -> Path:
    """`git archive <rev> rainbowpo` into a folder that goes first on PYTHONPATH."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "rainbowpo"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", type=Path, default=ROOT / "runs" / "bench" / "wl100k")
    p.add_argument(
        "--num-proc", type=int, default=2, help="tokenizing workers: ours (data.num_proc) and TRL's"
    )
    p.add_argument(
        "--baseline", default="36ea1b1", help="commit of 'today's code' (the pre-cache tokenize path)"
    )
    p.add_argument("--only", default="today,first,cached,trl", help="comma-separated subset of the rows")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    scratch = Path(tempfile.mkdtemp(prefix="bench-data-"))
    args.cache_dir = scratch / "cache"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(scratch / "hf"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    results = {}
    try:
        for variant in args.only.split(","):
            run_env = dict(env)
            if variant == "today":
                run_env["PYTHONPATH"] = str(baseline_tree(args.baseline, scratch / "baseline"))
            if variant in ("first", "trl", "today"):
                shutil.rmtree(scratch / "hf", ignore_errors=True)
            results[variant] = run_ranks(variant, args, run_env, 1 if variant == "trl" else 2)
            print(variant, json.dumps(results[variant]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    names = {"today": f"today ({args.baseline}): every rank tokenizes", "first": "first run: rank 0 builds the cache",
             "cached": "cached: both ranks map it", "trl": "TRL DPOTrainer._prepare_dataset (1 process)"}  # fmt: skip
    print(f"\n| data set-up, {results[next(iter(results))][0]['rows']:,} pairs, num_proc {args.num_proc} "
          "| seconds (slowest rank) | data RSS per rank, MiB | after reading every row, MiB |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for variant, ranks in results.items():
        seconds = max(r["seconds"] for r in ranks)
        rss = " / ".join(f"{r['rss_mib']:.0f}" for r in ranks)
        touched = " / ".join(f"{r['touched_mib']:.0f}" for r in ranks)
        print(f"| {names[variant]} | {seconds:.2f} | {rss} | {touched} |")
    if {"first", "cached", "today", "trl"} <= set(results):
        first = max(r["seconds"] for r in results["first"])
        ratios = {
            "cached / first run (target ≤ 0.10)": max(r["seconds"] for r in results["cached"]) / first,
            "first run / TRL (target ≤ 1)": first / results["trl"][0]["seconds"],
            "cached per-rank RSS / today's (target ≤ 0.25)": max(r["rss_mib"] for r in results["cached"])
            / max(r["rss_mib"] for r in results["today"]),
            "first-run per-rank RSS / today's": max(r["rss_mib"] for r in results["first"])
            / max(r["rss_mib"] for r in results["today"]),
        }
        for name, value in ratios.items():
            print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
