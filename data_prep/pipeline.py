"""generate → score → select in one command; every stage resumes from what is already on disk.

    python -m data_prep.pipeline --model runs/sft/final --prompts prompts.jsonl --out runs/prep \\
        --n 8 --reward data_prep.tasks.sort_task:reward --method rso --k 4 --beta-rso 0.5 --procs 2

Writes OUT/candidates/, OUT/scored/ and OUT/pairs.jsonl (rows ready for `data.train`).
With --procs P the generation runs as P processes (`--shard i/P` each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from data_prep import generate, score, select


def run_generation(args, out: str) -> None:
    settings = generate.sampler_settings(args)
    if args.procs == 1 and args.engine != "vllm":  # vllm: a subprocess, which moves to .venv-vllm
        generate.generate(args.model, args.prompts, out, settings, None, args.chunk)
        return
    base = [sys.executable, "-m", "data_prep.generate", "--model", args.model, "--prompts", args.prompts,
            "--out", out, "--chunk", str(args.chunk)]  # fmt: skip
    for key in ("n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "engine"):
        base += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key in generate.VLLM_FLAGS:
        if getattr(args, key) is not None:
            base += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = [subprocess.Popen(base + ["--shard", f"{i}/{args.procs}"], env=env) for i in range(args.procs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"generation failed in shard(s) {[i for i, c in enumerate(codes) if c]}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--reward", default=None)
    p.add_argument("--reward-model", default=None)
    p.add_argument("--method", choices=select.METHODS, default="rso")
    p.add_argument("--pairing", choices=select.PAIRINGS, default="first_round")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--beta-rso", type=float, default=0.5)
    p.add_argument("--min-gap", type=float, default=0.0)
    generate.add_sampling_args(p)
    args = p.parse_args(argv)
    scorer = score.make_scorer(args.reward, args.reward_model)  # fail on a bad scorer before sampling
    run_generation(args, os.path.join(args.out, "candidates"))
    score.score(os.path.join(args.out, "candidates"), os.path.join(args.out, "scored"), scorer)
    pairs = os.path.join(args.out, "pairs.jsonl")
    summary = select.select(os.path.join(args.out, "scored"), pairs, args.method, args.k, args.beta_rso,
                            args.min_gap, args.seed, args.pairing)  # fmt: skip
    print("data prep summary: " + json.dumps(summary) + f"\npairs: {pairs}")
    return summary


if __name__ == "__main__":
    main()
