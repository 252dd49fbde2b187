"""Evaluate a model on held-out prompts with a reward function or a reward model: mean reward, solve rate.

    python -m data_prep.evaluate --model runs/demo/rainbowpo/final --prompts heldout.jsonl \\
        --reward data_prep.tasks.sort_task:reward --out runs/demo/eval_rainbowpo.json
    python -m data_prep.evaluate --model M --prompts P --reward-model /models/rm [--batch-size 32] [--max-length N]
        [--chat-template-kwargs '{"enable_thinking": false}']   # as training's data.chat_template_kwargs

Greedy by default; with --temperature T --n N each prompt scores the mean of N sampled answers (the
expected reward that preference optimization maximizes). "Solved" means reward == 1 (reward functions).
The 95 % confidence interval of the mean reward is a percentile bootstrap over prompts (2,000 resamples,
seeded). Answers come from data_prep.generate's hf engine (--batch-prompts prompts per `generate` call,
left padding, on the process's accelerator; --dtype auto = bf16 on CUDA, fp32 on the CPU; each batch seeded
from (--seed, its prompt ids), so sampled answers depend on --batch-prompts); they are scored by
data_prep.score's scorers (a reward model batched by --batch-size sequences, loaded after the policy is freed).
Prompts too long for the model are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from tqdm.auto import tqdm

from data_prep import generate, score
from data_prep.common import accelerator_device, prompt_ids_of, read_jsonl, row_prompt
from rainbowpo.data.render import prompt_ids
from rainbowpo.lora import resolve_model_folder


def bootstrap_ci(values: list[float], seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def answer_all(
    model_path: str, rows: list[dict], settings: dict, batch_prompts: int, dtype: str, template_kwargs=None
) -> dict:
    """{prompt id: answers} from the batched hf engine ([] for a prompt too long for the model); prompts
    rendered with `template_kwargs` passed to the chat template."""
    device = str(accelerator_device())
    engine_args = argparse.Namespace(batch_prompts=batch_prompts, dtype=dtype, max_model_len=None)
    engine = generate.HfEngine(model_path, settings, engine_args, device)
    jobs = [(r["id"], prompt_ids(engine.tokenizer, row_prompt(r), template_kwargs)) for r in rows]
    answers, started = {}, time.perf_counter()
    with tqdm(total=len(jobs), desc=f"evaluate {model_path}", unit="prompt") as bar:
        for start in range(0, len(jobs), batch_prompts):
            batch = jobs[start : start + batch_prompts]
            answers.update(zip([pid for pid, _ in batch], engine.generate(batch)))
            bar.update(len(batch))
            bar.set_postfix_str(f"{engine.tokens / (time.perf_counter() - started):,.0f} tok/s")
    del engine  # free the policy before a reward model is loaded on the same device
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return answers


def evaluate(
    model_path: str,
    prompts_path: str,
    reward: str | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    n: int = 1,
    *,
    reward_model: str | None = None,
    batch_prompts: int = 16,
    dtype: str = "auto",
    seed: int = 0,
    scorer_options: dict | None = None,
    chat_template_kwargs: dict | None = None,
) -> dict:
    """Per prompt: the mean reward of its n answers (greedy when temperature = 0, then n = 1); prompts are
    rendered with `chat_template_kwargs` (training's data.chat_template_kwargs) passed to the chat template."""
    if batch_prompts < 1 or n < 1 or max_new_tokens < 1:
        raise ValueError("--batch-prompts, --n and --max-new-tokens must be >= 1")
    scorer = score.make_scorer(reward, reward_model, **(scorer_options or {}))  # checked before generating
    n = 1 if temperature <= 0 else n
    settings = {"n": n, "temperature": temperature, "top_p": 1.0, "top_k": 0, "max_new_tokens": max_new_tokens,
                "seed": seed}  # fmt: skip
    rows = prompt_ids_of(read_jsonl(prompts_path))
    started = time.perf_counter()
    folder = resolve_model_folder(model_path)  # a LoRA adapter folder: merged once, cached
    answers = answer_all(folder, rows, settings, batch_prompts, dtype, chat_template_kwargs)
    answered = [{**r, "candidates": answers[r["id"]]} for r in rows if answers[r["id"]]]
    if not answered:
        raise ValueError(f"{prompts_path}: every prompt is too long for {model_path}; nothing to evaluate")
    with tqdm(total=sum(len(r["candidates"]) for r in answered), desc="score", unit="seq") as bar:
        scores = scorer.score_rows(answered, progress=bar.update)
    per_prompt = [statistics.fmean(s) for s in scores]
    solved = [statistics.fmean(x == 1.0 for x in s) for s in scores]
    low, high = bootstrap_ci(per_prompt)
    return {
        "model": model_path,
        "prompts": len(answered),
        "skipped_too_long": len(rows) - len(answered),
        "truncated": scorer.truncated,
        "scorer": scorer.name,
        "mean_reward": statistics.fmean(per_prompt),
        "ci95": [low, high],
        "solve_rate": statistics.fmean(solved) if reward else None,
        "temperature": temperature,
        "samples_per_prompt": n,
        "batch_prompts": batch_prompts,
        "seconds": round(time.perf_counter() - started, 3),
        "rewards": per_prompt,
        "answers": [
            {"id": r["id"], "prompt": r.get("prompt"), "answers": r["candidates"], "rewards": s}
            for r, s in zip(answered, scores)
        ],
    }


def summary_line(result: dict) -> str:
    flat = [x for a in result["answers"] for x in a["rewards"]]
    solved = f", solved {result['solve_rate']:.1%}" if result["solve_rate"] is not None else ""
    return (f"{result['model']}: mean reward {result['mean_reward']:.3f} (95% CI {result['ci95'][0]:.3f}–"
            f"{result['ci95'][1]:.3f}){solved} of {result['prompts']} prompts, {len(flat)} answers scored, "
            f"{result['skipped_too_long']} skipped (too long), {result['truncated']} truncated | rewards min "
            f"{min(flat):.4g} mean {statistics.fmean(flat):.4g} max {max(flat):.4g}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples --n answers")
    p.add_argument("--n", type=int, default=1, help="answers per prompt when sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with the batch's prompt ids)")
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per generate call")
    p.add_argument("--out", default=None, help="write the full result (rewards, answers) as JSON")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    score.add_scoring_args(p)  # --reward | --reward-model and its flags, --dtype, --chat-template-kwargs
    args = p.parse_args(argv)
    options = score.scorer_options(args) if args.reward_model else {}
    try:
        result = evaluate(args.model, args.prompts, args.reward, args.max_new_tokens, args.temperature, args.n,
                          reward_model=args.reward_model, batch_prompts=args.batch_prompts, dtype=args.dtype,
                          seed=args.seed, scorer_options=options,
                          chat_template_kwargs=args.chat_template_kwargs)  # fmt: skip
    except ValueError as exc:
        raise SystemExit(f"evaluate: error: {exc}") from None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(summary_line(result))
    return result


if __name__ == "__main__":
    main()
