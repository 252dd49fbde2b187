"""Pair selection: RSO Algorithm 1 statistics, best_worst, all_pairs, ties and gaps; the sort task's reward."""

from __future__ import annotations

import json
import math
import random

import pytest

from data_prep.common import write_part
from data_prep.select import candidate_pairs, rso_sample, select
from data_prep.tasks import sort_task


def test_rso_first_acceptance_follows_exp_reward_over_beta():
    # k = 1: draws repeat until one is accepted, so P(j) = p_j / Σ p with p_j = exp((r_j − r_max)/β)
    # rewards [1, 0.5, 0], β = 0.5 → p = [1, e^-1, e^-2] → P ≈ [0.6652, 0.2447, 0.0900]
    rewards, beta, trials = [1.0, 0.5, 0.0], 0.5, 20_000
    p = [math.exp((r - 1.0) / beta) for r in rewards]
    expected = [x / sum(p) for x in p]
    assert expected == pytest.approx([0.6652, 0.2447, 0.0900], abs=1e-4)
    rng = random.Random(0)
    counts = [0, 0, 0]
    for _ in range(trials):
        counts[rso_sample(rewards, 1, beta, rng)[0]] += 1
    freq = [c / trials for c in counts]
    assert freq == pytest.approx(expected, abs=0.012)  # ≈ 3.5 binomial standard deviations


def test_rso_accepts_k_distinct_candidates():
    accepted = rso_sample([0.1, 0.9, 0.5, 0.7, 0.3], 4, beta=10.0, rng=random.Random(1))
    assert len(accepted) == 4 and len(set(accepted)) == 4


def test_best_worst_and_all_pairs():
    rng = random.Random(0)
    assert candidate_pairs([0.2, 0.9, 0.1, 0.5], "best_worst", rng, 4, 0.5) == [(1, 2)]
    assert sorted(candidate_pairs([0.2, 0.9, 0.2], "all_pairs", rng, 4, 0.5)) == [
        (1, 0),
        (1, 2),
    ]  # tie 0–2 skipped


def scored(tmp_path, rewards_per_prompt):
    rows = [{"id": str(i), "prompt": f"p{i}", "candidates": [f"c{k}" for k in range(len(r))], "rewards": r}
            for i, r in enumerate(rewards_per_prompt)]  # fmt: skip
    write_part(str(tmp_path / "scored"), "0", rows)
    return str(tmp_path / "scored")


def test_select_ties_gaps_and_counts(tmp_path):
    folder = scored(tmp_path, [[0.5, 0.5, 0.5], [0.9, 0.1], [0.6, 0.55]])
    out = str(tmp_path / "pairs.jsonl")
    summary = select(folder, out, "best_worst", 4, 0.5, min_gap=0.1, seed=0)
    pairs = [json.loads(line) for line in open(out)]
    assert summary["prompts"] == 3 and summary["pairs"] == 1
    assert summary["dropped_no_distinct_rewards"] == 1 and summary["dropped_gap_or_tie"] == 1
    assert pairs[0]["chosen"] == "c0" and pairs[0]["rejected"] == "c1" and pairs[0]["prompt"] == "p1"
    assert pairs[0]["provenance"]["rewards"] == [0.9, 0.1] and pairs[0]["provenance"]["candidate_ids"] == [
        0,
        1,
    ]


def test_rso_pairs_are_ordered_by_reward(tmp_path):
    folder = scored(tmp_path, [[0.1, 0.9, 0.5, 0.7, 0.3, 0.8]])
    out = str(tmp_path / "pairs.jsonl")
    select(folder, out, "rso", k=4, beta=10.0, min_gap=0.0, seed=0)
    pairs = [json.loads(line) for line in open(out)]
    assert len(pairs) == 2
    for p in pairs:
        assert p["provenance"]["rewards"][0] > p["provenance"]["rewards"][1]


@pytest.mark.parametrize(
    "completion, expected",
    [("1 2 5 9", 1.0), ("1 2 9 5", 0.5), ("1 2 5", 0.75), ("1 2 5 9 9", 0.8), ("", 0.0), ("one two", 0.0)],
)
def test_sort_reward_by_hand(completion, expected):
    # target [1, 2, 5, 9]: "1 2 9 5" → 2 of 4 positions; "1 2 5" → 3 of max(4, 3); "1 2 5 9 9" → 4 of 5
    assert sort_task.reward("sort: 5 2 9 1", completion, {"numbers": [5, 2, 9, 1]}) == expected


def test_sort_task_prompts_and_demos():
    rows = sort_task.make_prompts(50, seed=3)
    assert len({r["id"] for r in rows}) == 50
    row = rows[0]
    assert sort_task.is_solved(sort_task.solve(row), row["metadata"])
    rng = random.Random(0)
    demos = [sort_task.imperfect_demo(r, rng, error_rate=0.5) for r in rows]
    solved = sum(sort_task.is_solved(d, r["metadata"]) for d, r in zip(demos, rows))
    assert 10 < solved < 45  # imperfect: room to improve, but mostly informative


def test_empty_candidates_are_not_paired(tmp_path):
    rows = [{"id": "0", "prompt": "p", "candidates": ["", "a", "b"], "rewards": [0.0, 0.9, 0.5]}]
    write_part(str(tmp_path / "scored"), "0", rows)
    out = str(tmp_path / "pairs.jsonl")
    summary = select(str(tmp_path / "scored"), out, "best_worst", 4, 0.5, 0.0, 0)
    pair = json.loads(open(out).readline())
    assert summary["empty_candidates"] == 1 and (pair["chosen"], pair["rejected"]) == ("a", "b")
    assert pair["provenance"]["candidate_ids"] == [1, 2]
