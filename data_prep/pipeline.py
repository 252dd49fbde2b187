"""generate → score → select in one command; every stage resumes from what is already on disk.

    python -m data_prep.pipeline --model runs/sft/final --prompts prompts.jsonl --out runs/prep \\
        --n 8 --reward data_prep.tasks.sort_task:reward --method rso --k 4 --beta-rso 0.5 --procs 2

Writes OUT/candidates/, OUT/scored/ and OUT/pairs.jsonl (rows ready for `data.train`).
--chat-template-kwargs JSON (training's data.chat_template_kwargs, e.g. '{"enable_thinking": false}') goes
to the policy's chat template when prompts are rendered for sampling, and to the reward model's.
With --procs P the generation runs as P processes (`--shard i/P` each), process i pinned to GPUs
[i·TP, (i+1)·TP) (CUDA_VISIBLE_DEVICES), or on the CPU with the cores split between them.
Started by `deepspeed`/`torchrun` (several ranks; `bash launch/prep.sh --hostfile HOSTS ...`), every rank
generates its shard (RANK/WORLD_SIZE) on GPU(s) LOCAL_RANK, the ranks meet at a barrier, and rank 0 scores
and selects.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta

from data_prep import generate, score, select
from data_prep.common import launcher_ranks, place, visible_gpus

GENERATE_FLAGS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "engine", "chunk",
                  "batch_prompts", "dtype", "max_model_len", "tensor_parallel_size", "gpu_memory_utilization")  # fmt: skip


def child_command(args, out: str, i: int) -> list[str]:
    cmd = [sys.executable, "-m", "data_prep.generate", "--model", args.model, "--prompts", args.prompts,
           "--out", out, "--shard", f"{i}/{args.procs}"]  # fmt: skip
    for key in GENERATE_FLAGS:
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.chat_template_kwargs:
        cmd += ["--chat-template-kwargs", json.dumps(args.chat_template_kwargs)]
    return cmd


def run_generation(args, out: str) -> None:
    if args.procs < 1:
        raise ValueError(f"--procs {args.procs}: must be >= 1")
    if args.procs == 1:
        summary = generate.generate(args.model, args.prompts, out, args)
        print(generate.summary_line(summary, out), flush=True)
        return
    generate.check_args(args)
    gpus = visible_gpus()
    placements = [place(i, args.procs, args.tensor_parallel_size, gpus) for i in range(args.procs)]
    procs = [
        subprocess.Popen(child_command(args, out, i), env={**os.environ, **p.env()})
        for i, p in enumerate(placements)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"generation failed in shard(s) {[i for i, c in enumerate(codes) if c]}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--procs", type=int, default=1, help="generation processes on this machine, each on its own GPU(s)"
    )
    p.add_argument("--method", choices=select.METHODS, default="rso")
    p.add_argument("--pairing", choices=select.PAIRINGS, default="first_round")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--beta-rso", type=float, default=0.5)
    p.add_argument("--min-gap", type=float, default=0.0)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    score.add_scoring_args(p)  # --reward / --reward-model + the reward model's flags, and the shared --dtype
    generate.add_sampling_args(p)
    return p


def early_scorer(args):
    """A reward function now (cheap, so a bad --reward fails before sampling); a reward model only after
    generation, so it never shares the GPU with the policy (None here)."""
    if args.reward_model and not args.reward:
        return None
    return score.make_scorer(args.reward, args.reward_model)  # also: "give exactly one of ..."


def generate_on_ranks(args, launch) -> bool:
    """Under deepspeed/torchrun: every rank generates its shard (RANK/WORLD_SIZE), then waits for the others;
    True on rank 0, which goes on to score and select. The process group (gloo, no GPU memory) is created
    only after generation — joining it is the barrier — so no engine ever sees an initialised one."""
    import torch.distributed as dist

    if args.procs != 1:
        raise ValueError(
            "--procs is for one machine; under deepspeed/torchrun the launcher starts the processes"
        )
    out = os.path.join(args.out, "candidates")
    summary = generate.generate(args.model, args.prompts, out, args, f"{launch.rank}/{launch.world_size}")
    print(generate.summary_line(summary, out), flush=True)
    dist.init_process_group("gloo", timeout=timedelta(hours=72))  # the slowest rank may need hours
    dist.barrier()
    dist.destroy_process_group()
    return launch.rank == 0


def main(argv: list[str] | None = None) -> dict | None:
    args = parser().parse_args(argv)
    generate.reexec_for_vllm(args, "data_prep.pipeline", argv)
    launch = launcher_ranks()
    try:
        scorer = early_scorer(args)
        if launch and launch.world_size > 1:
            if not generate_on_ranks(args, launch):
                return None
        else:
            run_generation(args, os.path.join(args.out, "candidates"))
    except ValueError as exc:
        raise SystemExit(f"pipeline: error: {exc}") from None
    scorer = scorer or score.scorer_from_args(args)
    score.score(os.path.join(args.out, "candidates"), os.path.join(args.out, "scored"), scorer)
    pairs = os.path.join(args.out, "pairs.jsonl")
    summary = select.select(os.path.join(args.out, "scored"), pairs, args.method, args.k, args.beta_rso,
                            args.min_gap, args.seed, args.pairing)  # fmt: skip
    print("data prep summary: " + json.dumps(summary) + f"\npairs: {pairs}")
    return summary


if __name__ == "__main__":
    main()
