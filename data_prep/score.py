"""Stage 2 — score every candidate with a reward function or a reward model.

    python -m data_prep.score --candidates runs/prep/candidates --out runs/prep/scored \\
        --reward data_prep.tasks.sort_task:reward          # a Python function (prompt, completion, metadata) -> float
    python -m data_prep.score --candidates ... --out ... --reward-model /models/armo-rm   # AutoModelForSequenceClassification

Adds "rewards": [float] (one per candidate) and "scorer" to each row; resumable like generate.
"""

from __future__ import annotations

import argparse
import os

import torch
from tqdm.auto import tqdm

from data_prep.common import (
    checked_reward,
    done_ids,
    load_function,
    read_parts,
    require_keys,
    row_prompt,
    write_part,
)
from rainbowpo.fingerprint import model_fingerprint


class FunctionScorer:
    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_function(spec)
        self.name = spec

    def __call__(self, row: dict) -> list[float]:
        return [checked_reward(self.fn, self.spec, row, k, text) for k, text in enumerate(row["candidates"])]


class RewardModelScorer:
    """A sequence-classification reward model (num_labels = 1), batched over a prompt's candidates."""

    def __init__(self, path: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if (os.path.isabs(path) or path.startswith(".")) and not os.path.isdir(path):
            raise ValueError(f"--reward-model {path}: folder not found")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as exc:  # hub/offline/missing-file errors: many lines, one cause
            raise ValueError(
                f"--reward-model {path}: cannot load a reward model ({str(exc).strip().splitlines()[0]})"
            ) from None
        self.name = f"{path}@{model_fingerprint(path)}"

    def _text(self, row: dict, candidate: str) -> str:
        prompt = row_prompt(row)
        if getattr(self.tokenizer, "chat_template", None):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": candidate}], tokenize=False
            )
        return (prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)) + candidate

    @torch.no_grad()
    def __call__(self, row: dict) -> list[float]:
        texts = [self._text(row, c) for c in row["candidates"]]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        return self.model(**enc).logits[:, 0].float().tolist()


def score(candidates_dir: str, out_dir: str, scorer, chunk: int = 64) -> int:
    rows = read_parts(candidates_dir)
    if not rows:
        raise ValueError(f"no candidates in {candidates_dir}: run data_prep.generate first")
    require_keys(rows, ("id", "candidates"), candidates_dir, "data_prep.generate")
    finished = done_ids(out_dir)
    todo = [r for r in rows if r["id"] not in finished]
    for start in tqdm(range(0, len(todo), chunk), desc="score", unit="chunk", disable=not todo):
        part = todo[start : start + chunk]
        write_part(
            out_dir, f"{part[0]['id']}", [{**r, "rewards": scorer(r), "scorer": scorer.name} for r in part]
        )
    return len(todo)


def make_scorer(reward: str | None, reward_model: str | None):
    if bool(reward) == bool(reward_model):
        raise ValueError("give exactly one of --reward module:function or --reward-model PATH")
    return FunctionScorer(reward) if reward else RewardModelScorer(reward_model)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reward", default=None, help="module:function")
    p.add_argument("--reward-model", default=None, help="AutoModelForSequenceClassification folder")
    args = p.parse_args(argv)
    n = score(args.candidates, args.out, make_scorer(args.reward, args.reward_model))
    print(f"score: {n} prompts scored into {args.out}")


if __name__ == "__main__":
    main()
