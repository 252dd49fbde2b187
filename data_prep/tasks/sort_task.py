"""A synthetic task with a graded, verifiable reward: sort a short list of digits.

prompt:  "sort: 5 2 9 1"      answer: "1 2 5 9"
reward = (positions equal to the sorted list) / max(len(answer), len(completion)) ∈ [0, 1];
1.0 exactly when the completion is the sorted list (same multiset, right order).
"""

from __future__ import annotations

import random


def make_prompts(
    n: int, seed: int, min_len: int = 3, max_len: int = 5, max_value: int = 9, distinct: bool = False
) -> list[dict]:
    """n prompts "sort: ..." of min_len..max_len digits in 0..max_value (all different when distinct)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        if distinct:
            numbers = rng.sample(range(max_value + 1), length)
        else:
            numbers = [rng.randint(0, max_value) for _ in range(length)]
        rows.append(
            {
                "id": f"{seed}-{i}",
                "prompt": "sort: " + " ".join(map(str, numbers)),
                "metadata": {"numbers": numbers},
            }
        )
    return rows


def solve(row: dict) -> str:
    return " ".join(map(str, sorted(row["metadata"]["numbers"])))


def imperfect_demo(row: dict, rng: random.Random, error_rate: float = 0.5, drop: bool = True) -> str:
    """The right answer or, with probability error_rate, a flawed one: most flaws (60 %) sort in the wrong
    direction (a systematic demonstrator mistake that imitation copies), the rest swap an adjacent pair or
    (when `drop`) drop a number (slips)."""
    answer = sorted(row["metadata"]["numbers"])
    if rng.random() < error_rate and len(answer) > 1:
        kind, i = rng.random(), rng.randrange(len(answer) - 1)
        if kind < 0.6:
            answer.reverse()
        elif kind < 0.8 or not drop:
            answer[i], answer[i + 1] = answer[i + 1], answer[i]
        else:
            del answer[i]
    return " ".join(map(str, answer))


def parse(completion: str) -> list[int] | None:
    try:
        return [int(tok) for tok in completion.split()]
    except ValueError:
        return None


def reward(prompt, completion: str, metadata: dict) -> float:
    target = sorted(metadata["numbers"])
    guess = parse(completion)
    if not guess:
        return 0.0
    hits = sum(a == b for a, b in zip(guess, target))
    return hits / max(len(target), len(guess))


def is_solved(completion: str, metadata: dict) -> bool:
    return reward(None, completion, metadata) == 1.0
