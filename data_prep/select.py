"""Stage 3 — build preference pairs from scored candidates.

    python -m data_prep.select --scored runs/prep/scored --out runs/prep/pairs.jsonl --method rso \\
        --beta-rso 0.5 --k 4 --min-gap 0.0 --seed 0 [--pairing first_round|tournament]

Methods:
- rso: the RSO paper's Algorithm 1 (Liu et al., ICLR 2024, "Statistical Rejection Sampling Improves
  Preference Optimization", Appendix A.1), exactly. Per prompt the usable candidates are swept in a seeded
  shuffled order (for i.i.d. samples that is the paper's generation order). Each round takes r_max = the
  maximum reward of the candidates NOT yet accepted and sweeps those candidates in order, accepting c when
  u < exp((r_c − r_max)/β_rso), u ~ U(0, 1), until k are accepted. The round's best is always accepted
  when the sweep reaches it, so min(k, n) candidates come back.
- gumbel_topk: k candidates without replacement, each next one ∝ exp(r/β_rso) among those left
  (Plackett–Luce, drawn exactly by Gumbel-top-k); for k = 1 exactly softmax(r/β_rso) over the candidates.
  This is what `rso` did before (uniform draws against the maximum of all candidates, with a draw cap).
- best_worst: the highest- vs the lowest-reward candidate.
- all_pairs: every pair with distinct rewards.

Pairing of the k accepted candidates (rso, gumbel_topk), as in the RSO paper (Section 5.2):
- first_round: consecutive pairs (a1, a2), (a3, a4), … of the accepted list → k/2 pairs. For rso the
  list is Algorithm 1's acceptance order; for gumbel_topk it is the accepted set in a seeded shuffle.
- tournament: first_round, then the winners play on in the same way (an odd one out waits a round) until
  one is left → k − 1 pairs.
Each pair is ordered by reward. Empty candidates are never paired (counted); ties never form a pair; pairs
closer than --min-gap are dropped; a prompt with fewer than two distinct rewards gives no pair (counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Callable

from tqdm.auto import tqdm

from data_prep.common import read_parts, require_keys

METHODS = ("rso", "gumbel_topk", "best_worst", "all_pairs")
SAMPLERS = ("rso", "gumbel_topk")  # methods that accept k candidates, then pair them
PAIRINGS = ("first_round", "tournament")


def rso_algorithm1(rewards: list[float], k: int, beta: float, uniform: Callable[[], float]) -> list[int]:
    """RSO Algorithm 1 over candidates in sweep order 0, 1, …; returns accepted indices in acceptance order.

    One `uniform()` per candidate visited. Stops at k accepted or when none is left (so min(k, n) come
    back: the round's maximum has acceptance probability exp(0) = 1 > u).
    """
    remaining, accepted = list(range(len(rewards))), []
    while remaining and len(accepted) < k:
        r_max = max(rewards[c] for c in remaining)
        taken = set()
        for c in remaining:
            if uniform() < math.exp((rewards[c] - r_max) / beta):
                accepted.append(c)
                taken.add(c)
                if len(accepted) == k:
                    break
        remaining = [c for c in remaining if c not in taken]
    return accepted


def rso_sample(rewards: list[float], k: int, beta: float, rng: random.Random) -> list[int]:
    """Algorithm 1 with a seeded shuffle as the sweep order; accepted candidate indices in acceptance order."""
    order = list(range(len(rewards)))
    rng.shuffle(order)
    return [order[j] for j in rso_algorithm1([rewards[i] for i in order], k, beta, rng.random)]


def gumbel_topk(rewards: list[float], k: int, beta: float, rng: random.Random) -> list[int]:
    """k indices without replacement, sequentially ∝ exp(r/β): the k largest r/β + Gumbel(0, 1) keys.

    Gumbel(0, 1) = −log E with E ~ Exp(1) (E is floored at 1e-300: `expovariate` returns 0 with
    probability 2^-53).
    """
    keys = [r / beta - math.log(max(rng.expovariate(1.0), 1e-300)) for r in rewards]
    return sorted(range(len(rewards)), key=lambda i: -keys[i])[:k]


def pair_up(accepted: list[int], rewards: list[float], pairing: str) -> list[tuple[int, int]]:
    """Consecutive pairs of the accepted list, each (higher, lower) reward; `tournament` lets winners play on."""
    pairs, field = [], list(accepted)
    while len(field) > 1:
        winners = []
        for a, b in zip(field[0::2], field[1::2]):
            high, low = (a, b) if rewards[a] >= rewards[b] else (b, a)
            pairs.append((high, low))
            winners.append(high)
        if pairing == "first_round":
            break
        field = winners + field[len(field) - len(field) % 2 :]  # the odd one out plays next round
    return pairs


def candidate_pairs(
    rewards: list[float], method: str, rng: random.Random, k: int, beta: float, pairing: str = "first_round"
) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs before the tie / gap filter."""
    if method == "best_worst":
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        return [(best, worst)]
    if method == "all_pairs":
        return [(i, j) for i in range(len(rewards)) for j in range(len(rewards)) if rewards[i] > rewards[j]]
    if method == "rso":
        accepted = rso_sample(rewards, k, beta, rng)
    else:
        accepted = gumbel_topk(rewards, k, beta, rng)
        rng.shuffle(accepted)  # Gumbel order follows the reward; pair a random arrangement instead
    return pair_up(accepted, rewards, pairing)


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


def check_arguments(method: str, k: int, beta: float, pairing: str) -> None:
    if method not in METHODS:
        raise ValueError(f"select: unknown method {method!r}; choose one of {list(METHODS)}")
    if pairing not in PAIRINGS:
        raise ValueError(f"select: unknown pairing {pairing!r}; choose one of {list(PAIRINGS)}")
    if method in SAMPLERS and (not beta > 0 or k < 2):
        raise ValueError(
            f"select: {method} needs --beta-rso > 0 and --k >= 2 (a pair), got beta {beta}, k {k}"
        )


def read_scored(scored_dir: str) -> list[dict]:
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
    return sorted(rows, key=lambda r: r["id"])


def summary_line(s: dict) -> str:
    """The closing one-line summary: prompts, candidates, what was skipped, pairs, the rewards' spread."""
    return (
        f"select [{s['method']}]: {s['prompts']} prompts, {s['candidates']} candidates "
        f"({s.get('empty_candidates', 0)} empty); skipped: {s.get('dropped_no_distinct_rewards', 0)} prompts "
        f"without two distinct rewards, {s.get('dropped_gap_or_tie', 0)} with no pair past ties/--min-gap, "
        f"{s.get('prompts_under_k', 0)} with fewer than k usable candidates; {s['pairs']} pairs from "
        f"{s['prompts_with_pairs']} prompts; rewards mean {s['reward_mean']:.4g} sd {s['reward_std']:.4g} "
        f"[{s['reward_min']:.4g}, {s['reward_max']:.4g}]"
    )


def select(
    scored_dir: str,
    out_path: str,
    method: str,
    k: int,
    beta: float,
    min_gap: float,
    seed: int,
    pairing: str = "first_round",
) -> dict:
    """Pairs of every scored prompt into `out_path`; returns (and prints) the stage summary."""
    check_arguments(method, k, beta, pairing)
    rows = read_scored(scored_dir)
    stats, pairs, all_rewards = Counter(prompts=len(rows)), [], []
    for row in tqdm(rows, desc="select", unit="prompt", disable=len(rows) < 5000):
        all_rewards += row["rewards"]
        stats["candidates"] += len(row["rewards"])
        row = usable_candidates(row, stats)
        rewards = row["rewards"]
        stats["prompts_under_k"] += int(method in SAMPLERS and len(rewards) < k)
        if len(set(rewards)) < 2:
            stats["dropped_no_distinct_rewards"] += 1
            continue
        rng = random.Random(f"{seed}:{row['id']}")
        proposed = candidate_pairs(rewards, method, rng, k, beta, pairing)
        chosen = [(i, j) for i, j in proposed if keeps(rewards, i, j, min_gap)]
        stats["pairs_dropped_gap_or_tie"] += len(proposed) - len(chosen)
        stats["dropped_gap_or_tie"] += int(not chosen)
        stats["prompts_with_pairs"] += int(bool(chosen))
        pairs += [pair_row(row, i, j) for i, j in chosen]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    os.replace(tmp, out_path)
    summary = dict(stats) | {
        "pairs": len(pairs),
        "prompts_with_pairs": stats["prompts_with_pairs"],
        "method": method,
        "pairing": pairing if method in SAMPLERS else None,
        "reward_mean": statistics.fmean(all_rewards),
        "reward_std": statistics.pstdev(all_rewards),
        "reward_min": min(all_rewards),
        "reward_max": max(all_rewards),
    }
    print(summary_line(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scored", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=METHODS, default="rso")
    p.add_argument("--k", type=int, default=4, help="rso, gumbel_topk: candidates to accept per prompt")
    p.add_argument("--beta-rso", type=float, default=0.5, help="rso, gumbel_topk: reward temperature β_rso")
    p.add_argument(
        "--pairing", choices=PAIRINGS, default="first_round",
        help="rso, gumbel_topk: first_round = consecutive pairs of the accepted list (k/2 pairs); "
        "tournament = winners play on (k − 1 pairs)",
    )  # fmt: skip
    p.add_argument("--min-gap", type=float, default=0.0, help="minimum reward difference of a pair")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = select(
        args.scored, args.out, args.method, args.k, args.beta_rso, args.min_gap, args.seed, args.pairing
    )
    print("select: " + json.dumps(summary))


if __name__ == "__main__":
    main()
