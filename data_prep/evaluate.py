"""Evaluate a model on held-out prompts with a reward function: greedy answers, mean reward, solve rate.

    python -m data_prep.evaluate --model runs/demo/rainbowpo/final --prompts heldout.jsonl \\
        --reward data_prep.tasks.sort_task:reward --out runs/demo/eval_rainbowpo.json

Greedy by default; with --temperature T --n N each prompt scores the mean of N sampled answers (the
expected reward that preference optimization maximizes). "Solved" means reward == 1. The 95 %
confidence interval of the mean reward is a percentile bootstrap over prompts (2,000 resamples, seeded).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

from tqdm.auto import tqdm

from data_prep.common import checked_reward, load_function, prompt_ids_of, read_jsonl
from data_prep.generate import load_model, sample_hf
from rainbowpo.lora import resolve_model_folder


def bootstrap_ci(values: list[float], seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def evaluate(
    model_path: str,
    prompts_path: str,
    reward: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    n: int = 1,
) -> dict:
    """Per prompt: the mean reward of its n answers (greedy when temperature = 0, then n = 1)."""
    model_path = resolve_model_folder(model_path)  # a LoRA adapter folder: merged once, cached
    fn = load_function(reward)
    model, tokenizer = load_model(model_path)
    n = 1 if temperature <= 0 else n
    settings = {"n": n, "temperature": temperature, "top_p": 1.0, "top_k": 0, "max_new_tokens": max_new_tokens,
                "seed": 0}  # fmt: skip
    rows, answers, rewards, solved = prompt_ids_of(read_jsonl(prompts_path)), [], [], []
    for row in tqdm(rows, desc=f"evaluate {model_path}", unit="prompt"):
        texts = sample_hf(model, tokenizer, row, settings)[:n]
        scores = [checked_reward(fn, reward, row, k, t) for k, t in enumerate(texts)]
        answers.append({"id": row["id"], "prompt": row.get("prompt"), "answers": texts, "rewards": scores})
        rewards.append(statistics.fmean(scores))
        solved.append(statistics.fmean(s == 1.0 for s in scores))
    low, high = bootstrap_ci(rewards)
    return {
        "model": model_path,
        "prompts": len(rows),
        "mean_reward": statistics.fmean(rewards),
        "ci95": [low, high],
        "solve_rate": statistics.fmean(solved),
        "temperature": temperature,
        "samples_per_prompt": n,
        "rewards": rewards,
        "answers": answers,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--reward", required=True, help="module:function")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples --n answers")
    p.add_argument("--n", type=int, default=1, help="answers per prompt when sampling")
    p.add_argument("--out", default=None, help="write the full result (rewards, answers) as JSON")
    args = p.parse_args(argv)
    result = evaluate(args.model, args.prompts, args.reward, args.max_new_tokens, args.temperature, args.n)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(f"{args.model}: mean reward {result['mean_reward']:.3f} (95% CI {result['ci95'][0]:.3f}–"
          f"{result['ci95'][1]:.3f}), solved {result['solve_rate']:.1%} of {result['prompts']}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
