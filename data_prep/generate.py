"""Stage 1 — sample N candidate responses per prompt.

    python -m data_prep.generate --model runs/sft/final --prompts prompts.jsonl --out runs/prep/candidates \\
        --n 8 --temperature 1.0 --top-p 1.0 --max-new-tokens 64 --seed 0 [--shard 0/2] [--engine hf|vllm]
    deepspeed --hostfile hosts --module data_prep.generate ...     # one process per GPU, shard = RANK/WORLD_SIZE

Prompt rows: {"id", "prompt": str} or {"id", "messages": [...]} (+ any metadata columns, kept), rendered to
token ids by rainbowpo.data.render.prompt_ids (one BOS; --chat-template-kwargs JSON passed to the chat
template, as training passes data.chat_template_kwargs); engines get ids, never text.

Engines (one per process, built once): `hf` samples --batch-prompts prompts at a time (left padding, each
prompt prefilled once for its n samples) on the process's accelerator; `vllm` is data_prep.vllm_engine
(per-request seeds).
Batches are --batch-prompts consecutive prompts in file order, fixed BEFORE sharding: `--shard i/n` takes
batches i, i+n, …, and each batch is seeded from (seed, its prompt ids). So with `hf` a prompt's candidates
depend on the seed, --batch-prompts and its batch mates (and the sampler settings, model, dtype and device
numerics), never on --shard, --procs or a restart. Prompts longer than the model allows
(prompt + --max-new-tokens > --max-model-len or the model's max positions) are skipped and counted.
Output: part files of {…prompt row, "candidates": [str], "sampler": {...}, "model_fingerprint"}; a re-run
skips prompts already written, so a killed run resumes without losing or repeating a prompt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

import torch
from tqdm.auto import tqdm

from data_prep.common import (
    add_chat_template_args,
    done_ids,
    launcher_ranks,
    parse_shard,
    place,
    prompt_ids_of,
    read_jsonl,
    row_prompt,
    visible_gpus,
    write_part,
)
from rainbowpo.data.render import prompt_ids
from rainbowpo.fingerprint import model_fingerprint
from rainbowpo.lora import resolve_model_folder

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", "--samples", dest="n", type=int, default=8,
                   help="candidates per prompt (--samples: the same, for the deepspeed launcher, which takes --n as its own)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine", choices=["hf", "vllm"], default="hf", help="vllm: bash launch/setup_env.sh --vllm"
    )
    p.add_argument("--chunk", type=int, default=16, help="prompts per atomically written part file")
    p.add_argument("--batch-prompts", type=int, default=16,
                   help="hf: prompts per generate call; fixes which prompts share a batch (and its seed)")  # fmt: skip
    try:  # data_prep.pipeline may already have the reward model's --dtype: one flag for both models
        p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="model dtype (hf and vllm); auto = bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    except argparse.ArgumentError:
        pass
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + new tokens (default: the model's max positions); longer prompts are skipped")  # fmt: skip
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per engine (hf: 1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: fraction of GPU memory to reserve (default 0.9 on CUDA; on the CPU, of RAM: 0.1)")  # fmt: skip
    add_chat_template_args(p)


def check_args(args) -> None:
    """One line per bad setting, before any model is loaded."""
    if args.n < 1 or args.max_new_tokens < 1 or args.chunk < 1 or args.batch_prompts < 1:
        raise ValueError("--n, --max-new-tokens, --chunk and --batch-prompts must be >= 1")
    if args.engine == "hf" and args.tensor_parallel_size != 1:
        raise ValueError(
            f"--tensor-parallel-size {args.tensor_parallel_size}: the hf engine runs one device per process; "
            "use --engine vllm for tensor parallelism, or --procs to use more GPUs"
        )
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization {args.gpu_memory_utilization}: must be in (0, 1]")


def sampler_settings(args) -> dict:
    """Recorded in every output row (`sampler`): what the candidates were drawn with."""
    keys = (
        "n",
        "temperature",
        "top_p",
        "top_k",
        "max_new_tokens",
        "seed",
        "engine",
        "batch_prompts",
        "dtype",
    )
    return {k: getattr(args, k) for k in keys}


def batch_seed(seed: int, prompt_ids_: list[str]) -> int:
    """The seed of one hf batch: (seed, the batch's prompt ids in order) — independent of the sharding."""
    return (seed * 1_000_003 + zlib.crc32("\x1f".join(prompt_ids_).encode())) % (2**63)


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------------
# Placement: each process on its own device(s)


def pin_process(tp: int) -> str:
    """Restrict this process to its GPUs (before CUDA is initialised) and return its torch device.

    Under `deepspeed`/`torchrun` the process with LOCAL_RANK r of LOCAL_SIZE gets GPUs [r·tp, (r+1)·tp) of
    the node's visible ones; a `--procs` child arrives already pinned by its parent; a lone process takes
    the first tp GPUs. On the CPU the launcher's processes split the cores."""
    launch = launcher_ranks()
    index, procs = (launch.local_rank, launch.local_size) if launch else (0, 1)
    placement = place(index, procs, tp, visible_gpus())
    if placement.threads:
        torch.set_num_threads(placement.threads)
    if not placement.gpus or not torch.cuda.is_available():
        return "cpu"
    if torch.cuda.is_initialized():  # too late to narrow CUDA_VISIBLE_DEVICES: address the GPU by index
        return f"cuda:{index * tp}"
    os.environ.update(placement.env())  # read when CUDA initialises (and by vLLM's workers)
    return "cuda:0"


# ----------------------------------------------------------------------------------------------------------
# Engines: `.generate(jobs)` with jobs = [(prompt_id, prompt_token_ids)] → candidate texts per job
# ([] for a prompt too long for the model, counted in `.skipped`); `.tokens` counts candidate tokens.


def sampling_warpers(settings: dict) -> list:
    """temperature, top-k (0 = off), top-p (1 = off): transformers' logits warpers, as `generate` orders them."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if settings["temperature"] <= 0:
        return []
    warpers = [TemperatureLogitsWarper(settings["temperature"])] if settings["temperature"] != 1.0 else []
    if settings["top_k"]:
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    return warpers


class HfEngine:
    """A transformers causal LM on this process's device, --batch-prompts prompts per batch (left padding).

    Each batch of the call's jobs (consecutive groups of --batch-prompts) is seeded with
    batch_seed(seed, its prompt ids); the candidates of a prompt therefore depend on its batch mates."""

    def __init__(self, model_path: str, settings: dict, args, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings, self.device, self.batch_prompts = settings, device, args.batch_prompts
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = resolve_dtype(args.dtype, device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.max_len = args.max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.skipped, self.tokens = 0, 0
        self.warpers = sampling_warpers(settings)

    def fits(self, ids: list[int]) -> bool:
        """Room for the prompt and every new token (an empty prompt — no BOS, no text — has nothing to continue)."""
        return 0 < len(ids) and (
            self.max_len is None or len(ids) + self.settings["max_new_tokens"] <= self.max_len
        )

    def generate(self, jobs: list[tuple[str, list[int]]]) -> list[list[str]]:
        out: list[list[str]] = []
        for start in range(0, len(jobs), self.batch_prompts):
            out += self._batch(jobs[start : start + self.batch_prompts])
        return out

    @torch.no_grad()
    def _batch(self, jobs: list[tuple[str, list[int]]]) -> list[list[str]]:
        s = self.settings
        keep = [i for i, (_, ids) in enumerate(jobs) if self.fits(ids)]
        self.skipped += len(jobs) - len(keep)
        results: list[list[str]] = [[] for _ in jobs]
        if not keep:
            return results
        width = max(len(jobs[i][1]) for i in keep)
        ids = torch.full((len(keep), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(keep):  # left padding: every prompt ends where generation starts
            ids[row, width - len(jobs[i][1]) :] = torch.tensor(jobs[i][1])
            mask[row, width - len(jobs[i][1]) :] = 1
        greedy = s["temperature"] <= 0
        per_prompt = 1 if greedy else s["n"]
        torch.manual_seed(batch_seed(s["seed"], [pid for pid, _ in jobs]))
        generated = self._decode(ids.to(self.device), mask.to(self.device), per_prompt, greedy).cpu()
        for row, i in enumerate(keep):
            seqs = [self._cut(seq) for seq in generated[row * per_prompt : (row + 1) * per_prompt]]
            self.tokens += sum(len(seq) for seq in seqs)  # generated (greedy: one sequence, copied n times)
            texts = [t.strip() for t in self.tokenizer.batch_decode(seqs, skip_special_tokens=True)]
            results[i] = texts * s["n"] if greedy else texts
        return results

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, copies: int, greedy: bool) -> torch.Tensor:
        """Prefill the left-padded prompts once, repeat their KV cache for the `copies` samples
        (`generate(num_return_sequences=n)` would run every prompt n times), then sample token by token until
        every sequence has an EOS or --max-new-tokens; finished sequences get padding. → (rows·copies, T)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # fmt: skip
        cache.batch_repeat_interleave(copies)
        logits, mask = logits.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
        position = positions[:, -1:].repeat_interleave(copies, 0)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=ids.device)
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=ids.device)
        out = []
        for step in range(self.settings["max_new_tokens"]):
            token = logits.argmax(-1) if greedy else self._sample(logits)
            token = token.masked_fill(done, self.pad_id)
            out.append(token)
            done |= torch.isin(token, eos)
            if step + 1 == self.settings["max_new_tokens"] or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            logits = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                                past_key_values=cache, use_cache=True).logits[:, -1]  # fmt: skip
        return torch.stack(out, dim=1)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row from softmax(logits / T) after top-k and top-p (transformers' own warpers, in
        generate's order), drawn by inverse CDF (one uniform per row; torch.multinomial is ~30× slower here)."""
        scores = logits.float()
        for warp in self.warpers:
            scores = warp(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)

    def _cut(self, seq: torch.Tensor) -> list[int]:
        """The generated tokens up to and including the first EOS (what follows is padding)."""
        tokens = seq.tolist()
        for k, t in enumerate(tokens):
            if t in self.eos_ids:
                return tokens[: k + 1]
        return tokens


def make_engine(model_path: str, settings: dict, args, device: str):
    """The process's one engine; for vllm the HF model is never loaded."""
    if settings["engine"] == "vllm":
        try:
            from data_prep.vllm_engine import VllmEngine
        except ImportError as exc:
            raise ValueError(
                f"--engine vllm: cannot import the vLLM engine ({exc}); run `bash launch/setup_env.sh --vllm` "
                "and use .venv-vllm/bin/python, or use --engine hf"
            ) from None
        return VllmEngine(model_path, settings, args)
    return HfEngine(model_path, settings, args, device)


# ----------------------------------------------------------------------------------------------------------
# The stage


def shard_batches(
    rows: list[dict], batch_prompts: int, index: int, count: int
) -> list[list[tuple[int, dict]]]:
    """Batches of `batch_prompts` consecutive prompts in file order; this shard takes batches index, index+count, …"""
    batches = [list(enumerate(rows))[s : s + batch_prompts] for s in range(0, len(rows), batch_prompts)]
    return batches[index::count]


def generate(model_path: str, prompts_path: str, out_dir: str, args, shard: str | None = None) -> dict:
    """Sample every unfinished prompt of this shard; returns the stage summary (prompts done now, …)."""
    check_args(args)
    index, count = parse_shard(shard)
    rows = prompt_ids_of(read_jsonl(prompts_path))
    finished = done_ids(out_dir) | done_ids(os.path.join(out_dir, SKIPPED))
    batches = [
        b
        for b in shard_batches(rows, args.batch_prompts, index, count)
        if any(r["id"] not in finished for _, r in b)
    ]
    todo = sum(r["id"] not in finished for b in batches for _, r in b)
    summary = {"shard": f"{index}/{count}", "prompts": todo, "candidates": 0, "skipped": 0, "tokens": 0,
               "seconds": 0.0}  # fmt: skip
    if not batches:
        return summary
    device = pin_process(args.tensor_parallel_size)
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")  # "auto" resolved, for both engines
    args = argparse.Namespace(**{**vars(args), "dtype": dtype})
    settings = sampler_settings(args)
    model_path = resolve_model_folder(model_path)  # a LoRA adapter folder: merged once, cached
    engine = make_engine(model_path, settings, args, device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    extra = {"sampler": settings, "model_fingerprint": model_fingerprint(model_path)}
    template_kwargs = getattr(args, "chat_template_kwargs", None)  # training's data.chat_template_kwargs
    start = time.perf_counter()
    bar = tqdm(total=todo, desc=f"generate {index}/{count}", unit="prompt")
    for call in parts(batches, args.chunk, 256 if args.engine == "vllm" else 1):
        jobs = [(r["id"], prompt_ids(tokenizer, row_prompt(r), template_kwargs)) for b in call for _, r in b]
        candidates = dict(zip([pid for pid, _ in jobs], engine.generate(jobs)))
        for group in part_files(call, args.chunk):
            group = [(pos, r) for pos, r in group if r["id"] not in finished]
            summary["candidates"] += write_group(out_dir, f"{index}of{count}", group, candidates, extra)
            bar.update(len(group))
        summary["tokens"] = (
            engine.tokens
            if hasattr(engine, "tokens")
            else summary["tokens"]
            + sum(
                len(tokenizer(c, add_special_tokens=False).input_ids)
                for cs in candidates.values()
                for c in cs
            )
        )  # an engine without a count: the candidates re-encoded
        bar.set_postfix_str(f"{summary['tokens'] / (time.perf_counter() - start):,.0f} tok/s")
    bar.close()
    summary.update(skipped=engine.skipped, seconds=round(time.perf_counter() - start, 3))
    return summary


SKIPPED = "skipped"  # OUT/skipped/part-*.jsonl: ids of prompts too long for the model (delete to retry them)


def write_group(out_dir: str, shard: str, group: list, candidates: dict, extra: dict) -> int:
    """One part file of sampled rows, and the group's too-long prompts under OUT/skipped; returns candidates."""
    done = [
        (pos, {**r, "candidates": candidates[r["id"]], **extra}) for pos, r in group if candidates[r["id"]]
    ]
    skipped = [
        (pos, {"id": r["id"], "reason": "prompt too long (or empty)"})
        for pos, r in group
        if not candidates[r["id"]]
    ]
    for folder, items in ((out_dir, done), (os.path.join(out_dir, SKIPPED), skipped)):
        if items:  # named by the first row written, which no earlier part holds
            write_part(folder, f"{shard}-{items[0][0]:07d}", [row for _, row in items])
    return sum(len(row["candidates"]) for _, row in done)


def parts(batches: list, chunk: int, min_prompts: int) -> list[list]:
    """Engine calls: whole batches, at least `chunk` (and `min_prompts`) prompts per call."""
    calls, current = [], []
    for b in batches:
        current.append(b)
        if sum(len(x) for x in current) >= max(chunk, min_prompts):
            calls.append(current)
            current = []
    return calls + ([current] if current else [])


def part_files(call: list, chunk: int) -> list[list[tuple[int, dict]]]:
    """Part files of one engine call: whole batches, at least `chunk` prompts each (the last may be smaller)."""
    return [[x for b in p for x in b] for p in parts(call, chunk, 1)]


def summary_line(s: dict, out_dir: str) -> str:
    rate = s["tokens"] / s["seconds"] if s["seconds"] else 0.0
    return (f"generate: shard {s['shard']}: {s['prompts']} prompts, {s['candidates']} candidates, "
            f"{s['skipped']} skipped (too long), {s['tokens']:,} candidate tokens in {s['seconds']:.1f} s "
            f"({rate:,.0f} tok/s) → {out_dir}")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard", default=None, help="i/n (default: RANK/WORLD_SIZE of the launcher, or 0/1)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_sampling_args(p)
    return p


def reexec_for_vllm(args, module: str, argv: list[str] | None) -> None:
    """--engine vllm where vllm is not importable: re-run this command in .venv-vllm (data_prep.vllm_engine)."""
    if args.engine != "vllm":
        return
    try:
        from data_prep.vllm_engine import reexec_under_vllm_env
    except ImportError:
        return  # make_engine says what is missing, in one line
    reexec_under_vllm_env(module, sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    reexec_for_vllm(args, "data_prep.generate", argv)
    try:
        summary = generate(args.model, args.prompts, args.out, args, args.shard)
    except ValueError as exc:
        raise SystemExit(f"generate: error: {exc}") from None
    print(summary_line(summary, args.out), flush=True)
    return summary


if __name__ == "__main__":
    main()
