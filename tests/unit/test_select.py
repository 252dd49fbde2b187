"""Pair selection: RSO Algorithm 1 (hand-checked sweeps, statistics against an independent transcription,
k/2 pairs per prompt), the Gumbel-top-k variant, pairings, best_worst, all_pairs, ties, gaps, the summary;
the sort task's reward."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest

from data_prep.common import write_part
from data_prep.select import candidate_pairs, gumbel_topk, pair_up, rso_algorithm1, rso_sample, select
from data_prep.tasks import sort_task

# ----------------------------------------------------------------------------- RSO Algorithm 1, by hand


def sweep(rewards, k, beta, us):
    """Algorithm 1 on candidates in sweep order 0, 1, … with the given u's; also how many u's it used."""
    it = iter(us)
    used = []
    accepted = rso_algorithm1(rewards, k, beta, lambda: used.append(next(it)) or used[-1])
    return accepted, len(used)


def test_algorithm1_by_hand_rmax_is_over_the_not_yet_accepted():
    # rewards [0.2, 1.0, 0.6], β = 0.5. Round 1: r_max = 1.0, thresholds exp(-1.6) = 0.2019, 1, exp(-0.8) = 0.4493;
    # u = 0.5 rejects c0, 0.99 accepts c1, 0.6 rejects c2. Round 2: r_max = 0.6 (c1 is out), c0's threshold is now
    # exp(-0.8) = 0.4493, u = 0.3 accepts it → k = 2 reached after 4 u's. (With r_max over ALL candidates, c0's
    # threshold would stay 0.2019 and u = 0.3 would reject it.)
    assert sweep([0.2, 1.0, 0.6], 2, 0.5, [0.5, 0.99, 0.6, 0.3, 0.0]) == ([1, 0], 4)


def test_algorithm1_by_hand_stops_mid_sweep_at_k():
    # round 1: u = 0.1 < 0.2019 accepts c0, u = 0.5 < 1 accepts c1 → k = 2 after 2 u's; c2 never visited
    assert sweep([0.2, 1.0, 0.6], 2, 0.5, [0.1, 0.5, 0.0]) == ([0, 1], 2)


def test_algorithm1_by_hand_returns_min_k_n():
    # rewards [0, 3], β = 0.5, k = 4: round 1 threshold of c0 is exp(-6) = 0.0025 → u = 0.9 rejects, c1 accepted;
    # round 2: c0 alone, r_max = 0, threshold 1 → accepted. Two candidates back (min(k, n)), 3 u's.
    assert sweep([0.0, 3.0], 4, 0.5, [0.9, 0.9, 0.9]) == ([1, 0], 3)
    # the round's best is accepted whatever u in [0, 1) says
    assert sweep([5.0, -5.0, 2.0], 3, 0.5, [0.999999] * 6) == ([0, 2, 1], 6)


def test_pairings_by_hand():
    rewards = [0.1, 0.9, 0.5, 0.7, 0.3]
    # first round: (0, 1) → (1, 0), (2, 3) → (3, 2); candidate 4 is left over
    assert pair_up([0, 1, 2, 3, 4], rewards, "first_round") == [(1, 0), (3, 2)]
    # tournament: winners [1, 3] + the odd one out 4 → (1, 3); then [1, 4] → (1, 4); n − 1 = 4 pairs
    assert pair_up([0, 1, 2, 3, 4], rewards, "tournament") == [(1, 0), (3, 2), (1, 3), (1, 4)]
    assert pair_up([3], rewards, "tournament") == []


def test_algorithm1_two_candidates_k1_is_not_softmax():
    # k = 1, rewards [1, 0], β = 0.5: the lower one is accepted only when swept first (prob 1/2) and u < e^-2:
    # P = e^-2 / 2 = 0.0677 (softmax would give 1 / (1 + e^2) = 0.1192). 20,000 seeded shuffles;
    # tolerance 4.5 binomial standard errors = 4.5 · sqrt(0.0677 · 0.9323 / 20000) = 0.0080.
    trials = 20_000
    low = sum(rso_sample([1.0, 0.0], 1, 0.5, random.Random(f"0:{i}")) == [1] for i in range(trials)) / trials
    expected = math.exp(-2) / 2
    assert low == pytest.approx(expected, abs=4.5 * math.sqrt(expected * (1 - expected) / trials))


# ----------------------------------------------------------------------------- RSO Algorithm 1, statistics


def algorithm1_numpy(rewards: np.ndarray, k: int, beta: float, gen: np.random.Generator) -> np.ndarray:
    """Independent transcription of the paper's Algorithm 1: a boolean "accepted" mask per candidate.

    Sweep order: a random permutation. Each round draws one u per candidate of the permutation (u's of
    candidates already out are unused), takes r_max over the alive ones, and keeps the first k − |accepted|
    alive candidates (in sweep order) with u < exp((r − r_max)/β) — the paper's early `break` at k.
    """
    order = gen.permutation(len(rewards))
    alive = np.ones(len(rewards), dtype=bool)
    taken = 0
    while taken < k and alive.any():
        r_max = rewards[alive].max()
        u = gen.random(len(rewards))
        passes = alive[order] & (u < np.exp((rewards[order] - r_max) / beta))
        hits = order[passes][: k - taken]
        alive[hits] = False
        taken += len(hits)
    return ~alive


CASES = {
    # bounded rewards in [0, 1] (a verifiable task's score), β_rso = 0.5
    "bounded": ([0.55, 0.12, 0.93, 0.30, 0.81, 0.05, 0.64, 0.47], 4, 0.5),
    # bounded, colder β
    "bounded_cold": ([0.55, 0.12, 0.93, 0.30, 0.81, 0.05, 0.64, 0.47], 2, 0.1),
    # reward-model scale: a spread of 8.6 units, β_rso = 0.5
    "reward_model": ([1.7, -2.4, 3.9, 0.2, -0.8, 2.6, 5.1, -3.5], 4, 0.5),
}


def inclusion_by_select(tmp_path, method, rewards, k, beta, prompts):
    """Run the select stage on `prompts` prompts with the same rewards; per-candidate inclusion frequency."""
    folder = scored(tmp_path / method, [rewards] * prompts)
    out = str(tmp_path / method / "pairs.jsonl")
    select(folder, out, method, k, beta, min_gap=0.0, seed=0)
    per_prompt = Counter()
    counts = np.zeros(len(rewards))
    for line in open(out):
        prov = json.loads(line)["provenance"]
        per_prompt[prov["prompt_id"]] += 1
        counts[prov["candidate_ids"]] += 1
    # distinct rewards, k even, first-round pairing: k/2 pairs per prompt cover the k accepted exactly once
    assert len(per_prompt) == prompts and set(per_prompt.values()) == {k // 2}
    return counts / prompts


@pytest.mark.parametrize("case", list(CASES))
def test_rso_inclusion_frequencies_match_independent_algorithm1(tmp_path, case):
    # select over 4,000 seeded prompts vs the numpy transcription over 20,000 runs. Tolerance per candidate:
    # 4.5 standard errors of the difference of two binomial frequencies, sqrt(p(1-p)(1/4000 + 1/20000)) with
    # p the reference frequency (at most 0.0087, so 0.039), floored at 0.003 where p is ~0 or ~1. Over the
    # 24 comparisons the chance of a false failure is < 24 · 7e-6; the seeds are fixed, so the test is
    # deterministic. The check has power: the same comparison fails for the Gumbel-top-k estimator (asserted).
    rewards, k, beta = CASES[case]
    prompts, runs = 4_000, 20_000
    gen = np.random.default_rng(20240116)
    r = np.asarray(rewards)
    ref = np.mean([algorithm1_numpy(r, k, beta, gen) for _ in range(runs)], axis=0)
    tol = np.maximum(4.5 * np.sqrt(ref * (1 - ref) * (1 / prompts + 1 / runs)), 0.003)
    assert ref.sum() == pytest.approx(k)  # always min(k, n) = k accepted
    freq = inclusion_by_select(tmp_path, "rso", rewards, k, beta, prompts)
    assert np.all(np.abs(freq - ref) <= tol), (freq.round(4).tolist(), ref.round(4).tolist(), tol.round(4))
    other = inclusion_by_select(tmp_path, "gumbel_topk", rewards, k, beta, prompts)
    assert np.any(np.abs(other - ref) > tol), (other.round(4).tolist(), ref.round(4).tolist())


@pytest.mark.parametrize(
    "pairing, per_prompt", [("first_round", lambda k: k // 2), ("tournament", lambda k: k - 1)]
)
@pytest.mark.parametrize("scale", [1.0, 3.0])  # rewards in [0, 1], and reward-model scale (sd 3)
def test_every_prompt_with_k_usable_candidates_gives_k_over_2_pairs(tmp_path, pairing, per_prompt, scale):
    # 300 prompts, 4–12 candidates with distinct rewards, a few of them empty (not usable); k = 4 and 6,
    # β_rso = 0.5. A prompt with ≥ k usable candidates gives k/2 pairs (first round) or k − 1 (tournament);
    # one with m < k usable ones gives m // 2 (first round) or m − 1 (tournament).
    gen = np.random.default_rng(7)
    rows = []
    for i in range(300):
        n = int(gen.integers(4, 13))
        rewards = (gen.random(n) if scale == 1.0 else gen.normal(0.0, scale, n)).round(6).tolist()
        assert len(set(rewards)) == n
        texts = ["" if gen.random() < 0.1 else f"c{j}" for j in range(n)]
        rows.append({"id": f"{i:03d}", "prompt": f"p{i}", "candidates": texts, "rewards": rewards})
    write_part(str(tmp_path / "scored"), "0", rows)
    for k in (4, 6):
        out = str(tmp_path / f"pairs{k}.jsonl")
        summary = select(str(tmp_path / "scored"), out, "rso", k, 0.5, 0.0, seed=1, pairing=pairing)
        got = Counter(json.loads(line)["provenance"]["prompt_id"] for line in open(out))
        usable = {r["id"]: sum(bool(t) for t in r["candidates"]) for r in rows}
        want = {i: per_prompt(min(m, k)) if m >= 2 else 0 for i, m in usable.items()}
        assert {i: got.get(i, 0) for i in usable} == want
        assert summary["prompts_under_k"] == sum(m < k for m in usable.values()) > 0
        assert summary["pairs"] == sum(want.values())


# ----------------------------------------------------------------------------- Gumbel-top-k


def test_gumbel_topk_k1_follows_exp_reward_over_beta():
    # k = 1: P(j) = exp(r_j/β) / Σ exp(r/β); rewards [1, 0.5, 0], β = 0.5 → [0.6652, 0.2447, 0.0900].
    # 20,000 seeded draws; tolerance 4.5 binomial standard errors (≤ 4.5 · 0.0033 = 0.015).
    rewards, beta, trials = [1.0, 0.5, 0.0], 0.5, 20_000
    p = [math.exp((r - 1.0) / beta) for r in rewards]
    expected = np.array([x / sum(p) for x in p])
    assert expected == pytest.approx([0.6652, 0.2447, 0.0900], abs=1e-4)
    counts = np.zeros(3)
    for i in range(trials):
        counts[gumbel_topk(rewards, 1, beta, random.Random(f"0:{i}"))[0]] += 1
    tol = 4.5 * np.sqrt(expected * (1 - expected) / trials)
    assert np.all(np.abs(counts / trials - expected) <= tol)


def test_gumbel_topk_k2_inclusion_is_plackett_luce():
    # k = 2 without replacement: P(i in) = p_i + Σ_{j≠i} p_j · p_i / (1 − p_j) with p = softmax(r/β)
    # p = [0.6652, 0.2447, 0.0900] → P(0 in) = 0.6652 + 0.2447·0.6652/0.7553 + 0.0900·0.6652/0.9100 = 0.9466,
    # P(1 in) = 0.2447 + 0.6652·0.2447/0.3348 + 0.0900·0.2447/0.9100 = 0.7553, P(2 in) = 0.2981 (sum 2);
    # tolerance 4.5 binomial standard errors over 20,000 draws
    rewards, beta, trials = [1.0, 0.5, 0.0], 0.5, 20_000
    w = np.exp(np.asarray(rewards) / beta)
    p = w / w.sum()
    expected = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(3) if j != i) for i in range(3)])
    assert expected == pytest.approx([0.9466, 0.7553, 0.2981], abs=1e-4)
    counts = np.zeros(3)
    for i in range(trials):
        counts[gumbel_topk(rewards, 2, beta, random.Random(f"0:{i}"))] += 1
    tol = 4.5 * np.sqrt(expected * (1 - expected) / trials)
    assert np.all(np.abs(counts / trials - expected) <= tol)


def test_rso_accepts_k_distinct_candidates():
    for method in (rso_sample, gumbel_topk):
        accepted = method([0.1, 0.9, 0.5, 0.7, 0.3], 4, 10.0, random.Random(1))
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


def test_summary_line(tmp_path, capsys):
    # 3 prompts: one tie-only, one with an empty candidate, one fine; k = 4 > every prompt's usable count
    folder = scored(tmp_path, [[0.5, 0.5, 0.5], [0.9, 0.1], [0.6, 0.2, 0.4]])
    summary = select(folder, str(tmp_path / "pairs.jsonl"), "rso", 4, 0.5, min_gap=0.0, seed=0)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary["pairs"] == 2 and summary["prompts_with_pairs"] == 2 and summary["prompts_under_k"] == 3
    assert line == (
        "select [rso]: 3 prompts, 8 candidates (0 empty); skipped: 1 prompts without two distinct rewards, "
        "0 with no pair past ties/--min-gap, 3 with fewer than k usable candidates; 2 pairs from 2 prompts; "
        "rewards mean 0.4625 sd 0.2288 [0.1, 0.9]"
    )
