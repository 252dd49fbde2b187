"""Stage 1 — sample N candidate responses per prompt.

    python -m data_prep.generate --model runs/sft/final --prompts prompts.jsonl --out runs/prep/candidates \\
        --n 8 --temperature 1.0 --top-p 1.0 --max-new-tokens 64 --seed 0 [--shard 0/2] [--engine hf|vllm]

Prompt rows: {"id", "prompt": str} or {"id", "messages": [...]} (+ any metadata columns, kept).
Each prompt is sampled with its own seed (seed, id), so the output does not depend on sharding.
Output: part files of {…prompt row, "candidates": [str], "sampler": {...}, "model_fingerprint"}; a re-run
skips prompts already written, so a killed run resumes without losing or repeating a prompt.
"""

from __future__ import annotations

import argparse
import sys
import zlib

import torch
from tqdm.auto import tqdm

from data_prep.common import done_ids, parse_shard, prompt_ids_of, read_jsonl, row_prompt, write_part
from data_prep.vllm_engine import VllmEngine, reexec_under_vllm_env
from rainbowpo.data.render import prompt_ids, render_prompt
from rainbowpo.fingerprint import model_fingerprint


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=8, help="candidates per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="vllm when installed")
    p.add_argument("--chunk", type=int, default=16, help="prompts per atomically written part file")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per engine")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: memory fraction reserved (default 0.9 on CUDA, 0.1 of RAM on CPU)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None, help="vllm: longer prompts are skipped")
    p.add_argument("--dtype", default="auto", help="vllm: auto | bfloat16 | float16 | float32")


VLLM_FLAGS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype")


def sampler_settings(args) -> dict:
    keys = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "engine")
    return {k: getattr(args, k) for k in keys}


def prompt_text(tokenizer, row: dict) -> str:
    return render_prompt(tokenizer, row_prompt(row))


def prompt_seed(seed: int, prompt_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(prompt_id.encode())) % (2**63)


@torch.no_grad()
def sample_hf(model, tokenizer, row: dict, settings: dict) -> list[str]:
    ids = torch.tensor([prompt_ids(tokenizer, row_prompt(row))])
    torch.manual_seed(prompt_seed(settings["seed"], row["id"]))
    greedy = settings["temperature"] <= 0
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=not greedy,
        temperature=None if greedy else settings["temperature"],
        top_p=None if greedy else settings["top_p"],
        top_k=None if greedy or not settings["top_k"] else settings["top_k"],
        max_new_tokens=settings["max_new_tokens"],
        num_return_sequences=1 if greedy else settings["n"],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    return texts * settings["n"] if greedy else texts


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def generate(
    model_path: str, prompts_path: str, out_dir: str, settings: dict, shard: str | None, chunk: int, args=None
) -> int:
    """Sample every unfinished prompt of this shard; returns how many prompts were done now."""
    index, count = parse_shard(shard)
    rows = prompt_ids_of(read_jsonl(prompts_path))
    finished = done_ids(out_dir)
    todo = [(pos, r) for pos, r in enumerate(rows) if pos % count == index and r["id"] not in finished]
    if not todo:
        return 0
    if settings["engine"] == "vllm":
        from transformers import AutoTokenizer

        model, tokenizer = None, AutoTokenizer.from_pretrained(model_path)
        engine = VllmEngine(model_path, settings, args)  # one engine for the whole run
    else:
        model, tokenizer = load_model(model_path)
    fingerprint = model_fingerprint(model_path)
    bar = tqdm(total=len(todo), desc=f"generate {index}/{count}", unit="prompt")
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        if settings["engine"] == "vllm":
            jobs = [(r["id"], prompt_ids(tokenizer, row_prompt(r))) for _, r in part]
            candidates = engine.generate(jobs)
        else:
            candidates = [sample_hf(model, tokenizer, r, settings) for _, r in part]
        out = [
            {**r, "candidates": c, "sampler": settings, "model_fingerprint": fingerprint}
            for (_, r), c in zip(part, candidates)
        ]
        write_part(out_dir, f"{index}of{count}-{part[0][0]:07d}", out)
        bar.update(len(part))
    bar.close()
    if settings["engine"] == "vllm" and engine.skipped:
        print(f"generate: {engine.skipped} skipped (prompt ≥ max model length {engine.max_model_len} tokens)")
    return len(todo)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard", default=None, help="i/n (default: RANK/WORLD_SIZE of the launcher, or 0/1)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_sampling_args(p)
    args = p.parse_args(argv)
    if args.engine == "vllm" and argv is None:
        reexec_under_vllm_env("data_prep.generate", sys.argv[1:])
    n = generate(args.model, args.prompts, args.out, sampler_settings(args), args.shard, args.chunk, args)
    print(f"generate: {n} prompts sampled into {args.out}")


if __name__ == "__main__":
    main()
