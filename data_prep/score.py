"""Stage 2 — score every candidate with a reward function or a reward model.

    python -m data_prep.score --candidates runs/prep/candidates --out runs/prep/scored \\
        --reward data_prep.tasks.sort_task:reward          # a Python function (prompt, completion, metadata) -> float
    python -m data_prep.score --candidates ... --out ... --reward-model /models/armo-rm \\
        [--batch-size 32] [--max-length 4096] [--dtype bf16|fp16|fp32] [--trust-remote-code] [--shard i/n] \\
        [--chat-template-kwargs '{"enable_thinking": false}']   # options of the reward model's chat template

Adds "rewards": [float] (one per candidate) and "scorer" to each row; resumable like generate.
A reward model runs on the process's accelerator (`cuda:LOCAL_RANK`, bf16; else the CPU, fp32), batched
across prompts (`--batch-size` sequences of similar length), each sequence truncated to `--max-length`
tokens. Its reward is the output's `.score` where the model returns one (custom models such as ArmoRM),
else `logits[:, 0]` of a one-label sequence classifier. Under the deepspeed launcher or torchrun each
process scores its own shard (RANK/WORLD_SIZE) on its own GPU (LOCAL_RANK):

    deepspeed --num_gpus 8 --module data_prep.score --candidates ... --out ... --reward-model /models/rm
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from data_prep.common import (
    DTYPES,
    accelerator_device,
    add_chat_template_args,
    checked_reward,
    default_dtype,
    done_ids,
    load_function,
    parse_shard,
    read_parts,
    require_keys,
    row_prompt,
    write_part,
)
from rainbowpo.data.render import encode_prompt, prompt_ids, render_conversation
from rainbowpo.fingerprint import model_fingerprint

Prompt = str | list[dict]


@dataclass
class ScoreSummary:
    """The stage's closing line: prompts, candidates scored, truncated sequences, the rewards' spread."""

    prompts: int = 0
    candidates: int = 0
    truncated: int = 0
    seconds: float = 0.0
    rewards: list[float] = field(default_factory=list)

    def line(self) -> str:
        spread = "-"
        if self.rewards:
            r = self.rewards
            spread = f"min {min(r):.4g} mean {statistics.fmean(r):.4g} max {max(r):.4g}"
        rate = self.candidates / self.seconds if self.seconds > 0 else 0.0
        return (
            f"score: {self.prompts} prompts, {self.candidates} candidates scored ({rate:.1f} sequences/s), "
            f"{self.truncated} truncated | rewards {spread}"
        )


class FunctionScorer:
    """A Python reward function `module:function` (prompt, completion, metadata) -> float."""

    truncated = 0

    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_function(spec)
        self.name = spec

    def __call__(self, row: dict) -> list[float]:
        return [checked_reward(self.fn, self.spec, row, k, text) for k, text in enumerate(row["candidates"])]

    def score_rows(
        self, rows: list[dict], progress: Callable[[int], None] | None = None
    ) -> list[list[float]]:
        out = []
        for row in rows:
            out.append(self(row))
            if progress:
                progress(len(row["candidates"]))
        return out


class RewardModelScorer:
    """A reward model scoring (prompt, response) pairs in batches on one device.

    `RewardModelScorer(path, batch_size=32, max_length=None, dtype=None, device=None, trust_remote_code=False)`
    loads `AutoModelForSequenceClassification` from `path` (dtype None: bf16 on CUDA, fp32 on the CPU;
    device None: `cuda:LOCAL_RANK` where CUDA is present, else the CPU; max_length None: the model's
    `max_position_embeddings`, else 4096). `model=` and `tokenizer=` pass objects built in-process instead;
    `chat_template_kwargs` (e.g. {"enable_thinking": False}) go to the reward model's chat template.

    `score_pairs([(prompt, response), ...]) -> [float]` is the whole API (`score_rows` and `__call__` wrap
    it for candidate rows). Each pair is rendered as the chat [user: prompt, assistant: response] with the
    reward model's own chat template where it has one, else as the prompt's ids followed by the response's
    (the training stage's boundary rule), both through `rainbowpo.data.render` (exactly one BOS). Sequences
    longer than `max_length` keep their first `max_length` tokens (counted in `truncated`). Batches are
    right-padded by this class (the tokenizer's padding side does not matter) with a pad id that occurs in
    none of the batch's sequences, set as the model's `pad_token_id` for the call, so a model that finds
    its last token by the pad id (stock sequence classifiers, ArmoRM) reads the last real token — a
    tokenizer without pad token (Llama-3) and pad = EOS both work, and padding does not change a score.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        model=None,
        tokenizer=None,
        chat_template_kwargs: dict | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"--max-length must be >= 1, got {max_length}")
        if isinstance(dtype, str):
            default_dtype("cpu", dtype)  # a bad flag fails now, not after generation
        self.path, self.dtype, self.trust_remote_code = path, dtype, trust_remote_code
        self.device = torch.device(device) if device is not None else None  # None: chosen when loading
        if model is None:  # the folder, its config and tokenizer are checked now; weights load on first use
            config, tokenizer = open_reward_model(path, trust_remote_code)
            self.name = f"{path}@{model_fingerprint(path)}"
        else:
            config, self.name = model.config, path or type(model).__name__
        self._model, self.tokenizer = model, tokenizer
        positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        self.max_length = max_length if max_length is not None else positions or 4096
        self.batch_size, self.truncated = batch_size, 0
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    @property
    def model(self):
        """The model on its device, loaded on first use (so a pipeline can check it before generating)."""
        if self._model is None or self.device is None:
            self.device = self.device or accelerator_device()
            if self._model is None:
                dtype = self.dtype
                if not isinstance(dtype, torch.dtype):
                    dtype = default_dtype(self.device, dtype)
                self._model = load_weights(self.path, dtype, self.device, self.trust_remote_code)
            self._model = self._model.to(self.device).eval()
        return self._model

    def load(self) -> RewardModelScorer:
        """Load the weights now (e.g. before timing `score_pairs`); returns the scorer."""
        _ = self.model
        return self

    # ------------------------------------------------------------------ rendering
    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of one (prompt, response): the RM's chat template, else prompt ids + response ids."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            chat = [*messages, {"role": "assistant", "content": response}]
            return encode_prompt(tok, render_conversation(tok, chat, self.chat_template_kwargs))
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
        return prompt_ids(tok, text) + tok(response, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ scoring
    def score_pairs(
        self, pairs: Sequence[tuple[Prompt, str]], progress: Callable[[int], None] | None = None
    ) -> list[float]:
        """One reward per (prompt, response), scored `batch_size` sequences at a time, longest first."""
        seqs = [self.encode(p, r) for p, r in pairs]
        self.truncated += sum(len(s) > self.max_length for s in seqs)
        seqs = [s[: self.max_length] for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
        rewards = [0.0] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, r in zip(batch, self._forward([seqs[i] for i in batch])):
                rewards[i] = r
            if progress:
                progress(len(batch))
        return rewards

    def score_rows(
        self, rows: list[dict], progress: Callable[[int], None] | None = None
    ) -> list[list[float]]:
        """Rewards of every candidate of every row, batched across rows."""
        pairs = [(row_prompt(r), c) for r in rows for c in r["candidates"]]
        flat, out = self.score_pairs(pairs, progress), []
        for r in rows:
            out.append(flat[: len(r["candidates"])])
            flat = flat[len(r["candidates"]) :]
        return out

    def __call__(self, row: dict) -> list[float]:
        return self.score_rows([row])[0]

    @torch.no_grad()
    def _forward(self, seqs: list[list[int]]) -> list[float]:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s, dtype=torch.long), 1
        model = self.model
        pad = self._pad_id(ids, mask)
        ids[mask == 0] = pad
        model.config.pad_token_id = pad
        model.config.get_text_config().pad_token_id = pad
        out = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return self._rewards(out, len(seqs))

    def _pad_id(self, ids: torch.Tensor, mask: torch.Tensor) -> int:
        """The model's or tokenizer's pad, else EOS, else UNK, else any id — the first not in the batch."""
        tok, config = self.tokenizer, self.model.config.get_text_config()
        present = set(ids[mask == 1].unique().tolist())
        preferred = (
            getattr(config, "pad_token_id", None),
            tok.pad_token_id,
            tok.eos_token_id,
            tok.unk_token_id,
        )
        for pad in preferred:
            if isinstance(pad, int) and pad not in present:
                return pad
        return next(i for i in range(len(present) + 1) if i not in present)

    def _rewards(self, out, batch: int) -> list[float]:
        score = getattr(out, "score", None) if not isinstance(out, tuple) else None
        if score is None:
            logits = out.logits if hasattr(out, "logits") else out[0]
            if logits.ndim != 2 or logits.shape[1] != 1:
                raise ValueError(
                    f"--reward-model {self.name}: the model returns logits of shape {tuple(logits.shape)}; "
                    "a reward model gives one number per sequence (num_labels = 1, or an output with .score)"
                )
            score = logits
        if score.numel() != batch:
            raise ValueError(
                f"--reward-model {self.name}: .score has shape {tuple(score.shape)} for {batch} sequences; "
                "expected one number per sequence"
            )
        return score.float().reshape(batch).tolist()


def open_reward_model(path: str, trust_remote_code: bool):
    """Config (refusing checkpoints without a score head) and tokenizer of a reward model folder."""
    from transformers import AutoConfig, AutoTokenizer

    if (os.path.isabs(path) or path.startswith(".")) and not os.path.isdir(path):
        raise ValueError(f"--reward-model {path}: folder not found")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:  # hub/offline/missing-file/remote-code errors: one cause
        raise ValueError(
            f"--reward-model {path}: cannot load a reward model ({_first_line(exc, trust_remote_code)})"
        ) from None
    check_score_head(path, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"--reward-model {path}: cannot load its tokenizer ({_first_line(exc, trust_remote_code)})"
        ) from None
    return config, tokenizer


def load_weights(path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool):
    """`AutoModelForSequenceClassification` on `device`; weights missing from the checkpoint are an error."""
    from transformers import AutoModelForSequenceClassification

    placement = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **placement
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"--reward-model {path}: cannot load a reward model ({_first_line(exc, trust_remote_code)})"
        ) from None
    missing = [k for k in info.get("missing_keys", ()) if k]
    if missing:
        raise ValueError(
            f"--reward-model {path}: {len(missing)} weight(s) are not in the checkpoint ({sorted(missing)[0]}, …), "
            "so the score head would be random; give a trained reward model"
        )
    return model


def _first_line(exc: Exception, trust_remote_code: bool) -> str:
    if "trust_remote_code" in str(exc) and not trust_remote_code:
        return "the folder has custom model code; add --trust-remote-code if you trust it"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_score_head(path: str, config) -> None:
    """A causal-LM checkpoint (or a classifier with num_labels != 1 and no custom code) is not a reward model."""
    archs = list(getattr(config, "architectures", None) or [])
    custom = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    if archs and not custom and not any("SequenceClassification" in a or "Reward" in a for a in archs):
        raise ValueError(
            f"--reward-model {path}: {archs[0]} has no score head (a language model, not a reward model); "
            "give an AutoModelForSequenceClassification checkpoint with num_labels = 1, or a custom reward "
            "model (--trust-remote-code) whose output has .score"
        )
    if not custom and getattr(config, "num_labels", 1) != 1:
        raise ValueError(
            f"--reward-model {path}: a classifier with num_labels = {config.num_labels}; a reward model has one "
            "output (num_labels = 1) or returns .score"
        )


# ----------------------------------------------------------------------------- the stage
def shard_of(row_id: str, count: int) -> int:
    """Which of `count` shards scores this prompt: by its id, so it never depends on file order."""
    return zlib.crc32(str(row_id).encode()) % count


def part_name(index: int, count: int, first_id: str) -> str:
    """A part file name unique per first row (a row is written once), safe for any id."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(first_id))[:40]
    return f"{index}of{count}-{safe}-{zlib.crc32(str(first_id).encode()):08x}"


def score(
    candidates_dir: str, out_dir: str, scorer, chunk: int = 64, shard: str | None = "0/1"
) -> ScoreSummary:
    """Score this shard's unfinished prompts, `chunk` prompts per part file; prints and returns the summary.

    shard "i/n", or None for RANK/WORLD_SIZE of the launcher (the CLI's default); as a function it scores
    every prompt unless told otherwise."""
    index, count = parse_shard(shard)
    rows = read_parts(candidates_dir)
    if not rows:
        raise ValueError(f"no candidates in {candidates_dir}: run data_prep.generate first")
    require_keys(rows, ("id", "candidates"), candidates_dir, "data_prep.generate")
    finished = done_ids(out_dir)
    todo = [r for r in rows if shard_of(r["id"], count) == index and str(r["id"]) not in finished]
    summary, start_truncated, started = ScoreSummary(), scorer.truncated, time.perf_counter()
    total = sum(len(r["candidates"]) for r in todo)
    bar = tqdm(total=total, desc=f"score {index}/{count}", unit="seq", disable=not total)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        rewards = scorer.score_rows(part, progress=bar.update)
        write_part(out_dir, part_name(index, count, part[0]["id"]),
                   [{**r, "rewards": s, "scorer": scorer.name} for r, s in zip(part, rewards)])  # fmt: skip
        summary.prompts += len(part)
        summary.candidates += sum(len(s) for s in rewards)
        summary.rewards.extend(x for s in rewards for x in s)
    bar.close()
    summary.truncated, summary.seconds = scorer.truncated - start_truncated, time.perf_counter() - started
    print(summary.line() + f" -> {out_dir}")
    return summary


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """--reward / --reward-model and the reward model's flags (see add_reward_model_args)."""
    p.add_argument("--reward", default=None, help="module:function")
    p.add_argument(
        "--reward-model", default=None, help="a reward model folder (AutoModelForSequenceClassification)"
    )
    add_reward_model_args(p)


def add_reward_model_args(p: argparse.ArgumentParser) -> None:
    """--batch-size, --max-length, --trust-remote-code, and --dtype and --chat-template-kwargs unless the
    parser has them (the pipeline's and evaluate's, shared with generation)."""
    p.add_argument("--batch-size", type=int, default=32, help="reward model: sequences per forward")
    p.add_argument("--max-length", type=int, default=None,
                   help="reward model: keep the first N tokens of each sequence (default: the model's context)")  # fmt: skip
    p.add_argument(
        "--trust-remote-code", action="store_true", help="reward model: run the folder's own model code"
    )
    try:
        p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="model dtype; auto = bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    except argparse.ArgumentError:
        pass  # already defined by the caller (one --dtype for the whole run)
    add_chat_template_args(p)  # the reward model's chat template (ignored without one, and by --reward)


def make_scorer(reward: str | None, reward_model: str | None, **model_options):
    """A FunctionScorer for `reward`, a RewardModelScorer (with `model_options`) for `reward_model`."""
    if bool(reward) == bool(reward_model):
        raise ValueError("give exactly one of --reward module:function or --reward-model PATH")
    return FunctionScorer(reward) if reward else RewardModelScorer(reward_model, **model_options)


def scorer_options(args) -> dict:
    """The reward model's options from the flags of `add_reward_model_args` (absent flags: defaults)."""
    return {"batch_size": getattr(args, "batch_size", 32), "max_length": getattr(args, "max_length", None),
            "dtype": getattr(args, "dtype", None), "trust_remote_code": getattr(args, "trust_remote_code", False),
            "chat_template_kwargs": getattr(args, "chat_template_kwargs", None)}  # fmt: skip


def scorer_from_args(args):
    """make_scorer from the flags of `add_scoring_args`."""
    return make_scorer(args.reward, args.reward_model, **(scorer_options(args) if args.reward_model else {}))


def main(argv: list[str] | None = None) -> ScoreSummary:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard", default=None, help="i/n (default: RANK/WORLD_SIZE of the launcher, or 0/1)")
    p.add_argument("--chunk", type=int, default=64, help="prompts per atomically written part file")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_scoring_args(p)
    args = p.parse_args(argv)
    try:
        return score(args.candidates, args.out, scorer_from_args(args), args.chunk, args.shard)
    except ValueError as exc:
        raise SystemExit(f"score: error: {exc}") from None


if __name__ == "__main__":
    main()
