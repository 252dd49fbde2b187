"""Stage 3 — build preference pairs from scored candidates.

    python -m data_prep.select --scored runs/prep/scored --out runs/prep/pairs.jsonl --method rso \\
        --beta-rso 0.5 --k 4 --min-gap 0.0 --seed 0

Methods:
- best_worst: the highest- vs the lowest-reward candidate.
- rso: statistical rejection sampling (Liu et al. 2024, "Statistical Rejection Sampling Improves
  Preference Optimization", Algorithm 1): draw a not-yet-accepted candidate uniformly, accept it when
  u < exp((r − r_max)/β_rso), u ~ U(0, 1), until k are accepted (or a draw cap is hit); this samples
  from π(y|x)·exp(r/β_rso) ∝ the optimal policy. The accepted set is shuffled (seeded) and paired
  consecutively, each pair ordered by reward.
- all_pairs: every pair with distinct rewards.
Empty candidates are never paired (counted); ties never form a pair; pairs closer than --min-gap are dropped; a prompt with fewer than two distinct
rewards gives no pair and is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
from collections import Counter

from data_prep.common import read_parts, require_keys

METHODS = ("rso", "best_worst", "all_pairs")


def rso_accept(reward: float, r_max: float, beta: float, u: float) -> bool:
    return u < math.exp((reward - r_max) / beta)


def rso_sample(
    rewards: list[float], k: int, beta: float, rng: random.Random, max_draws: int = 10_000
) -> list[int]:
    """RSO Algorithm 1 over candidate indices; returns the accepted indices in acceptance order."""
    r_max = max(rewards)
    pool, accepted = list(range(len(rewards))), []
    for _ in range(max_draws):
        if len(accepted) == k or not pool:
            break
        j = rng.choice(pool)
        if rso_accept(rewards[j], r_max, beta, rng.random()):
            accepted.append(j)
            pool.remove(j)
    return accepted


def candidate_pairs(
    rewards: list[float], method: str, rng: random.Random, k: int, beta: float
) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs before the gap filter."""
    if method == "best_worst":
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        return [(best, worst)]
    if method == "all_pairs":
        return [(i, j) for i in range(len(rewards)) for j in range(len(rewards)) if rewards[i] > rewards[j]]
    accepted = rso_sample(rewards, k, beta, rng)
    rng.shuffle(accepted)
    pairs = []
    for a, b in zip(accepted[0::2], accepted[1::2]):
        pairs.append((a, b) if rewards[a] >= rewards[b] else (b, a))
    return pairs


def usable_candidates(row: dict, stats: Counter) -> dict:
    """Drop empty candidates (an empty response is not a trainable answer); keep their original ids."""
    keep = [k for k, text in enumerate(row["candidates"]) if text.strip()]
    stats["empty_candidates"] += len(row["candidates"]) - len(keep)
    return {**row, "candidates": [row["candidates"][k] for k in keep], "rewards": [row["rewards"][k] for k in keep],
            "candidate_ids": keep}  # fmt: skip


def keeps(rewards: list[float], i: int, j: int, min_gap: float) -> bool:
    """Strictly better (ties never pair) and at least `min_gap` apart."""
    return rewards[i] > rewards[j] and rewards[i] - rewards[j] >= min_gap


def pair_row(row: dict, i: int, j: int) -> dict:
    conversational = "messages" in row
    as_turn = lambda text: [{"role": "assistant", "content": text}] if conversational else text  # noqa: E731
    return {
        "prompt": row["messages"] if conversational else row["prompt"],
        "chosen": as_turn(row["candidates"][i]),
        "rejected": as_turn(row["candidates"][j]),
        "provenance": {
            "prompt_id": row["id"],
            "candidate_ids": [row["candidate_ids"][i], row["candidate_ids"][j]],
            "rewards": [row["rewards"][i], row["rewards"][j]],
            "sampler": row.get("sampler"),
            "model_fingerprint": row.get("model_fingerprint"),
            "scorer": row.get("scorer"),
        },
    }


def select(
    scored_dir: str, out_path: str, method: str, k: int, beta: float, min_gap: float, seed: int
) -> dict:
    if method not in METHODS:
        raise ValueError(f"select: unknown method {method!r}; choose one of {list(METHODS)}")
    if method == "rso" and (beta <= 0 or k < 2):
        raise ValueError(f"select: rso needs --beta-rso > 0 and --k >= 2 (a pair), got beta {beta}, k {k}")
    rows = read_parts(scored_dir)
    if not rows:
        raise ValueError(f"no scored candidates in {scored_dir}: run data_prep.score first")
    require_keys(rows, ("id", "candidates", "rewards"), scored_dir, "data_prep.score")
    for row in rows:
        if not isinstance(row["rewards"], list) or len(row["rewards"]) != len(row["candidates"]):
            raise ValueError(
                f"{scored_dir}: prompt id {row['id']} has {len(row['candidates'])} candidates but rewards "
                f"{row['rewards']!r:.80}; re-run data_prep.score for it"
            )
    rows = sorted(rows, key=lambda r: r["id"])
    stats, pairs, all_rewards = Counter(prompts=len(rows)), [], []
    for row in rows:
        all_rewards += row["rewards"]
        stats["candidates"] += len(row["rewards"])
        row = usable_candidates(row, stats)
        rewards = row["rewards"]
        if len(set(rewards)) < 2:
            stats["dropped_no_distinct_rewards"] += 1
            continue
        rng = random.Random(f"{seed}:{row['id']}")
        chosen = [
            (i, j) for i, j in candidate_pairs(rewards, method, rng, k, beta) if keeps(rewards, i, j, min_gap)
        ]
        stats["dropped_gap_or_tie"] += int(not chosen)
        pairs += [pair_row(row, i, j) for i, j in chosen]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    os.replace(tmp, out_path)
    stats["pairs"] = len(pairs)
    spread = {
        "reward_mean": statistics.fmean(all_rewards),
        "reward_min": min(all_rewards),
        "reward_max": max(all_rewards),
    }
    return dict(stats) | spread


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scored", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=METHODS, default="rso")
    p.add_argument("--k", type=int, default=4, help="rso: candidates to accept per prompt")
    p.add_argument("--beta-rso", type=float, default=0.5, help="rso: reward temperature β_rso")
    p.add_argument("--min-gap", type=float, default=0.0, help="minimum reward difference of a pair")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = select(args.scored, args.out, args.method, args.k, args.beta_rso, args.min_gap, args.seed)
    print("select: " + json.dumps(summary))


if __name__ == "__main__":
    main()
