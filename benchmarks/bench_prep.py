"""Data-prep throughput: candidate tokens/s of the generation engines and reward-model sequences/s, one run.

    python benchmarks/bench_prep.py                    # table printed (the shared workload, made once)
    python benchmarks/bench_prep.py --write            # and appended to docs/benchmarks.md
    python benchmarks/bench_prep.py --size 0.5b        # on a GPU: a ~0.4B random Llama, tokens/s per GPU

Workload: ../shared/bench/make_workload.py's tokenizer and random tiny Llama (4 layers, d=256, vocab 8192),
the first --prompts (64) prompts of its train.jsonl (16–128 words), --n 8 samples × --max-new-tokens 32.
Rows (each in this process, models loaded before the clock, generation only on it):

- `per-prompt loop` — the generate loop before batching (`reference_per_prompt_loop`, kept here verbatim):
  one `model.generate` per prompt with num_return_sequences = n;
- `hf batched` — data_prep.generate.HfEngine, --batch-prompts prompts per call (left padding);
- `vllm` — data_prep.vllm_engine.VllmEngine in `.venv-vllm` (bash launch/setup_env.sh --vllm), its own
  process; "not run" when that environment is absent. Engine start is reported apart from the clock;
- `reward model` — data_prep.score's RewardModelScorer on a random LlamaForSequenceClassification of the same
  size, scoring the hf engine's candidates (prompt + candidate sequences).

Candidate tokens are counted the same way for every engine: the workload's word-level tokenizer encodes
each candidate text (one word = one token; an EOS the model emitted is not counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
SIZES = {  # --size → LlamaConfig overrides on the workload's model (vocab 8192 stays, for its tokenizer)
    "tiny": {},
    "0.5b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),  # fmt: skip  0.40B in the blocks + 17M embeddings
}


# ----------------------------------------------------------------------------------------------------------
# The reference: data_prep.generate's per-prompt loop before batching (commit 36ea1b1), verbatim.


def reference_per_prompt_loop(model, tokenizer, rows: list[dict], settings: dict) -> list[list[str]]:
    import zlib

    import torch

    from rainbowpo.data.render import prompt_ids

    def prompt_seed(seed: int, prompt_id: str) -> int:
        return (seed * 1_000_003 + zlib.crc32(prompt_id.encode())) % (2**63)

    @torch.no_grad()
    def sample_hf(model, tokenizer, row: dict, settings: dict) -> list[str]:
        ids = torch.tensor([prompt_ids(tokenizer, row["prompt"])])
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
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return texts * settings["n"] if greedy else texts

    return [sample_hf(model, tokenizer, r, settings) for r in rows]


# ----------------------------------------------------------------------------------------------------------
# Workload


def make_workload(folder: Path, size: str) -> Path:
    """The shared workload (made once) and a model folder holding its tokenizer: folder/gen-<size>."""
    if not (folder / "train.jsonl").exists():
        subprocess.run([sys.executable, str(BENCH / "make_workload.py"), "--out", str(folder)], check=True)
    model_dir = folder / f"gen-{size}"
    if not (model_dir / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = json.loads((folder / "model" / "config.json").read_text())
        if size == "tiny":
            shutil.copytree(folder / "model", model_dir, dirs_exist_ok=True)
        else:
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**{**config, **SIZES[size]})).save_pretrained(model_dir)
        for f in (folder / "tokenizer").iterdir():
            shutil.copy(f, model_dir / f.name)
    return model_dir


def prompts(folder: Path, count: int) -> list[dict]:
    rows = [json.loads(line) for line in open(folder / "train.jsonl")][:count]
    return [{"id": str(i), "prompt": r["prompt"]} for i, r in enumerate(rows)]


def count_tokens(tokenizer, candidates: list[list[str]]) -> int:
    return sum(len(tokenizer(c, add_special_tokens=False).input_ids) for cands in candidates for c in cands)


# ----------------------------------------------------------------------------------------------------------
# Rows


def engine_args(args, engine: str) -> argparse.Namespace:
    from data_prep import generate

    argv = ["--model", "m", "--prompts", "p", "--out", "o", "--engine", engine, "--n", str(args.n),
            "--max-new-tokens", str(args.max_new_tokens), "--batch-prompts", str(args.batch_prompts),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization)]  # fmt: skip
    return generate.parser().parse_args(argv)


def device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def run_loop(model_dir: Path, rows: list[dict], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep import generate

    if device() != "cpu":
        return {"name": "per-prompt loop", "note": "not run: the old loop ran on the CPU only"}
    settings = generate.sampler_settings(engine_args(args, "hf"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference_per_prompt_loop(model, tokenizer, rows[:1], {**settings, "max_new_tokens": 2})  # warm-up
    start = time.perf_counter()
    cands = reference_per_prompt_loop(model, tokenizer, rows, settings)
    return result("per-prompt loop", tokenizer, cands, time.perf_counter() - start)


def run_engine(model_dir: Path, rows: list[dict], args, name: str) -> tuple[dict, list[list[str]]]:
    from transformers import AutoTokenizer

    from data_prep import generate
    from rainbowpo.data.render import prompt_ids

    eargs = engine_args(args, "vllm" if name == "vllm" else "hf")
    eargs.dtype = str(generate.resolve_dtype(eargs.dtype, device())).removeprefix("torch.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    engine = generate.make_engine(str(model_dir), generate.sampler_settings(eargs), eargs, device())
    startup = time.perf_counter() - started
    jobs = [(r["id"], prompt_ids(tokenizer, r["prompt"])) for r in rows]
    engine.generate(jobs[:1])  # warm-up; the table counts the timed call's tokens only
    start = time.perf_counter()
    cands = engine.generate(jobs)
    out = result(name, tokenizer, cands, time.perf_counter() - start)
    out.update(engine_start_s=round(startup, 1),
               skipped=getattr(engine, "skipped", None), dtype=eargs.dtype)  # fmt: skip
    return out, cands


def result(name: str, tokenizer, cands: list[list[str]], seconds: float) -> dict:
    tokens = count_tokens(tokenizer, cands)
    return {"name": name, "candidates": sum(map(len, cands)), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip


def run_vllm(model_dir: Path, args) -> dict:
    python = args.vllm_python
    if not python.exists():
        return {"name": "vllm", "note": f"not run: {python} absent (bash launch/setup_env.sh --vllm)"}
    cmd = [str(python), __file__, "--child-vllm", str(model_dir), *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"name": "vllm", "note": f"failed (exit {proc.returncode}): {tail[0][:200]}"}
    return json.loads(lines[-1])


def run_reward_model(model_dir: Path, rows: list[dict], cands: list[list[str]], args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from data_prep import score

    rm_dir = model_dir.parent / f"rm-{model_dir.name}"
    if not (rm_dir / "config.json").exists():
        config = LlamaConfig.from_pretrained(model_dir)
        config.num_labels = 1
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(rm_dir)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(rm_dir)
    scorer = score.make_scorer(None, str(rm_dir))
    scored = [{**r, "candidates": c} for r, c in zip(rows, cands)]
    api = "score_rows" if hasattr(scorer, "score_rows") else "per prompt (__call__)"
    start = time.perf_counter()
    rewards = scorer.score_rows(scored) if hasattr(scorer, "score_rows") else [scorer(r) for r in scored]
    seconds = time.perf_counter() - start
    sequences = sum(map(len, rewards))
    return {"name": "reward model", "sequences": sequences, "seconds": round(seconds, 2),
            "sequences_per_s": round(sequences / seconds, 1), "api": api,
            "batch_size": getattr(scorer, "batch_size", None)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Driver


def table(rows: list[dict]) -> str:
    base = next(
        (r["tokens_per_s"] for r in rows if r["name"] == "per-prompt loop" and "tokens_per_s" in r), None
    )
    lines = ["| row | candidates | candidate tokens | seconds | tokens/s | × per-prompt loop | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if "sequences_per_s" in r:
            lines.append(f"| reward model | {r['sequences']} sequences | — | {r['seconds']} | "
                         f"{r['sequences_per_s']:,} sequences/s | — | scorer API: {r['api']}, batch {r['batch_size']} |")  # fmt: skip
        elif "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "—"
            note = f"engine start {r['engine_start_s']} s, {r['dtype']}" if "engine_start_s" in r else ""
            lines.append(f"| {r['name']} | {r['candidates']} | {r['tokens']:,} | {r['seconds']} | "
                         f"{r['tokens_per_s']:,.0f} | {ratio} | {note} |")  # fmt: skip
        else:
            lines.append(f"| {r['name']} | — | — | — | — | — | {r['note']} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", type=Path, default=ROOT / "runs" / "bench-workload")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=None, help="vllm (default 0.9 CUDA, 0.1 CPU)"
    )
    p.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    p.add_argument("--only", default="loop,hf,vllm,rm", help="rows to run, comma-separated")
    p.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    p.add_argument("--child-vllm", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gpu_memory_utilization is None:
        import torch

        args.gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.1
    return args


def main(argv=None) -> None:
    args = parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.child_vllm:  # inside .venv-vllm: one JSON line
        rows = prompts(args.workload, args.prompts)
        print(json.dumps(run_engine(args.child_vllm, rows, args, "vllm")[0]), flush=True)
        return
    model_dir, rows = make_workload(args.workload, args.size), prompts(args.workload, args.prompts)
    only, results, cands = args.only.split(","), [], None
    if "loop" in only:
        results.append(run_loop(model_dir, rows, args))
    if "hf" in only or "rm" in only:
        out, cands = run_engine(model_dir, rows, args, "hf batched")
        results.append(
            {**out, "name": f"hf batched ({args.batch_prompts} prompts/call)"} if "hf" in only else None
        )
    if "vllm" in only:
        results.append(run_vllm(model_dir, args))
    if "rm" in only:
        results.append(run_reward_model(model_dir, rows, cands, args))
    results = [r for r in results if r]
    for r in results:
        print(json.dumps(r))
    text = report(args, results)
    print(text)
    if args.write:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + text + "\n")


def report(args, results: list[dict]) -> str:
    import torch

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    command = "python benchmarks/bench_prep.py " + " ".join(sys.argv[1:])
    return (f"### {when}: `{command.strip()}`\n\n{args.prompts} prompts × {args.n} samples × {args.max_new_tokens} "
            f"new tokens, model `{args.size}` ({where}, {platform.machine()}).\n\n{table(results)}")  # fmt: skip


if __name__ == "__main__":
    main()
