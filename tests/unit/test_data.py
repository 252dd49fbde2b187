"""Sources, formats, the exact prompt/response boundary, truncation, bad rows, and the step planner."""

from __future__ import annotations

import json
import random

import pytest

from rainbowpo.config import load_config
from rainbowpo.data.sampler import StepPlanner, token_budget_grad_accum
from rainbowpo.data.tokenize import load_examples

WORDS = "alpha beta gamma one two red blue sort héllo".split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, rows, tok, mode="preference", **data):
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    over = ["model.path=x", f"data.train={src}"] + [f"data.{k}={v}" for k, v in data.items()]
    cfg = load_config(None, over)
    return load_examples(cfg.data, cfg.data.train, tok, mode, 0)


STANDARD = {"prompt": "sort alpha beta", "chosen": "one two", "rejected": "red"}
CONVERSATION = {
    "prompt": [{"role": "user", "content": "sort alpha"}],
    "chosen": [{"role": "assistant", "content": "one two"}],
    "rejected": [{"role": "assistant", "content": "red"}],
}


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_standard_boundary(tmp_path, toks, name):
    tok = toks[name]
    (ex,), summary = load(tmp_path, [STANDARD], tok)
    assert ex.prompt_ids == tok("sort alpha beta").input_ids  # the prompt alone, with its special tokens
    assert ex.chosen_ids == tok("one two", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.rejected_ids == tok("red", add_special_tokens=False).input_ids + [tok.eos_token_id]
    bos_count = sum(i == tok.bos_token_id for i in ex.prompt_ids + ex.chosen_ids) if tok.bos_token_id else 0
    assert bos_count == (1 if name == "sp" else 0)
    for resp in (ex.chosen_ids, ex.rejected_ids):
        assert resp.count(tok.eos_token_id) == 1 and resp[-1] == tok.eos_token_id
    assert summary.kept == 1 and summary.response_lengths == [len(ex.chosen_ids), len(ex.rejected_ids)]


@pytest.mark.parametrize("name", ["sp_chat", "bpe_chat"])
def test_conversational_and_implicit(tmp_path, toks, name):
    tok = toks[name]
    (ex,), _ = load(tmp_path, [CONVERSATION], tok)
    prompt_text = tok.apply_chat_template(CONVERSATION["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert prompt_text.endswith("assistant\n")
    assert tok.decode(ex.chosen_ids, skip_special_tokens=False).startswith("one two<|im_end|>")
    if name == "bpe_chat":  # <|im_end|> is a special token: the template's end of turn, no EOS after it
        assert tok.eos_token_id not in ex.chosen_ids
        assert ex.chosen_ids == tok("one two<|im_end|>\n", add_special_tokens=False).input_ids
    else:  # "<|im_end|>" is plain text to this tokenizer: the response still ends with EOS, once
        assert ex.chosen_ids[-1] == tok.eos_token_id and ex.chosen_ids.count(tok.eos_token_id) == 1
    implicit = {"chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
                "rejected": CONVERSATION["prompt"] + CONVERSATION["rejected"]}  # fmt: skip
    (ex2,), _ = load(tmp_path, [implicit], tok)
    assert ex2 == ex  # the prompt is the longest common message prefix


def test_sft_rows(tmp_path, toks):
    tok = toks["sp_chat"]
    rows = [{"prompt": "sort alpha", "completion": "one"},
            {"messages": CONVERSATION["prompt"] + CONVERSATION["chosen"]}]  # fmt: skip
    (a, b), _ = load(tmp_path, rows, tok, mode="sft")
    assert a.completion_ids == tok("one", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert b.completion_ids[-1] == tok.eos_token_id


def test_truncation(tmp_path, toks):
    tok = toks["sp"]
    long_prompt = " ".join(["alpha beta"] * 20)
    rows = [{"prompt": long_prompt, "chosen": " ".join(["one"] * 30), "rejected": "red"}, STANDARD]
    exs, s = load(tmp_path, rows, tok, max_length=16, max_prompt_length=6)
    ex = exs[0]
    full = tok(long_prompt).input_ids
    assert ex.prompt_ids == [full[0]] + full[-5:]  # BOS kept, the prompt's end kept
    assert len(ex.prompt_ids) + len(ex.chosen_ids) == 16 and ex.chosen_ids[-1] != tok.eos_token_id
    assert s.truncated == 1 and s.kept == 2
    exs, _ = load(tmp_path, rows, tok, max_length=16, max_prompt_length=6, truncation_keep_eos=True)
    assert exs[0].chosen_ids[-1] == tok.eos_token_id and len(exs[0].chosen_ids) == 10


def test_pair_identical_after_truncation_is_dropped_and_counted(tmp_path, toks):
    # max_prompt_length < max_length always leaves a response token; a pair whose responses only
    # differ after the cut cannot teach a preference and is dropped, counted by reason
    rows = [STANDARD, {"prompt": "alpha", "chosen": "one two one", "rejected": "one two red"}]
    exs, s = load(tmp_path, rows, toks["sp"], max_length=4, max_prompt_length=2)
    assert len(exs) == 1 and s.read == 2 and s.dropped == {"identical_after_truncation": 1}
    assert "dropped {'identical_after_truncation': 1}" in s.format()


BAD_ROWS = [
    ({"prompt": "a", "rejected": "b"}, "missing column 'chosen'"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "'prompt' is a message list but this source's rows are standard"),
]  # fmt: skip


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_rows_name_source_row_and_problem(tmp_path, toks, row, message):
    with pytest.raises(ValueError) as err:
        load(tmp_path, [STANDARD, row], toks["sp_chat"])
    text = str(err.value)
    assert "data.train[0] rows.jsonl row 2" in text and message in text and "on_bad_row: skip" in text


def test_broken_message_list(tmp_path, toks):
    broken = {"prompt": [{"role": "user"}], "chosen": "x", "rejected": "y"}
    with pytest.raises(
        ValueError, match=r"row 2: 'prompt' must be a non-empty list of \{role, content\} messages"
    ):
        load(tmp_path, [CONVERSATION, broken], toks["sp_chat"])


def test_bad_rows_skipped_and_counted(tmp_path, toks):
    rows = [STANDARD] + [row for row, _ in BAD_ROWS]
    exs, s = load(tmp_path, rows, toks["sp_chat"], on_bad_row="skip")
    assert len(exs) == 1 and sum(s.skipped.values()) == len(BAD_ROWS)
    assert s.skipped["empty"] == 2 and s.skipped["missing_column"] == 1 and s.skipped["mixed_formats"] == 1
    with pytest.raises(ValueError, match="no usable rows"):
        load(tmp_path, rows[1:], toks["sp_chat"], on_bad_row="skip")


def test_sources_formats_mapping_and_weights(tmp_path, toks):
    import datasets

    rows = [{"q": f"alpha {i}", "good": "one", "bad": "two"} for i in range(4)]
    table = datasets.Dataset.from_list(rows)
    table.to_json(str(tmp_path / "a.jsonl"))
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    mapping = "{prompt: q, chosen: good, rejected: bad}"
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv", "saved"):
        cfg = load_config(
            None, ["model.path=x", f"data.train=[{{path: {tmp_path / name}, columns: {mapping}}}]"]
        )
        exs, _ = load_examples(cfg.data, cfg.data.train, toks["sp"], "preference", 0)
        assert len(exs) == 4, name
    two = f"[{{path: {tmp_path / 'a.jsonl'}, columns: {mapping}, weight: 2}}, {{path: {tmp_path / 'a.csv'}, columns: {mapping}, weight: 0.5}}]"
    cfg = load_config(None, ["model.path=x", f"data.train={two}"])
    exs, s = load_examples(cfg.data, cfg.data.train, toks["sp"], "preference", 0)
    assert s.read == 8 + 2 and [e.row_id for e in exs] == list(range(10))
    bad = load_config(
        None, ["model.path=x", f"data.train=[{{path: {tmp_path / 'a.jsonl'}, columns: {{prompt: nope}}}}]"]
    )
    with pytest.raises(ValueError, match="nope"):
        load_examples(bad.data, bad.data.train, toks["sp"], "preference", 0)


def test_tokenizer_without_eos(tmp_path, toks):
    tok = toks["bpe"]
    eos = tok.eos_token
    tok.eos_token = None
    try:
        with pytest.raises(ValueError, match="no EOS"):
            load(tmp_path, [STANDARD], tok)
    finally:
        tok.eos_token = eos


# ----------------------------------------------------------------------------- sampler

LENGTHS = [random.Random(i).randint(10, 100) for i in range(19)]


@pytest.mark.parametrize("world, accum, budget", [(1, 2, 0), (2, 2, 0), (3, 1, 0), (2, 2, 60), (3, 2, 50)])
def test_every_pair_at_most_once_per_epoch(world, accum, budget):
    planner = StepPlanner(LENGTHS, 8, world, accum, seed=0, micro_batch_tokens=budget)
    # 19 = 8 + 8 + 3: the 3 form their own step when 3 >= world × accum micro-batches, else are dropped
    assert planner.dropped_per_epoch == (3 if world * accum > 3 else 0)
    for epoch in range(2):
        seen = []
        for step in range(planner.steps_per_epoch):
            plan = planner.step_plan(epoch, step)
            assert len(plan) == world and all(len(r) == accum and all(r) for r in plan)
            seen += [i for rank in plan for micro in rank for i in micro]
            assert planner.pairs_in_step(epoch, step) == sum(len(m) for rank in plan for m in rank)
        assert len(seen) == len(set(seen)) == 19 - planner.dropped_per_epoch


def test_deterministic_different_per_epoch_and_restorable():
    a, b = StepPlanner(LENGTHS, 8, 2, 2, seed=3), StepPlanner(LENGTHS, 8, 2, 2, seed=3)
    assert a.step_plan(0, 1) == b.step_plan(0, 1)
    assert a.step_pairs(0, 0) != a.step_pairs(1, 0)
    assert StepPlanner(LENGTHS, 8, 2, 2, seed=4).step_pairs(0, 0) != a.step_pairs(0, 0)
    # a fresh planner asked for (epoch 1, step 1) continues exactly where a long-running one would be
    assert StepPlanner(LENGTHS, 8, 2, 2, seed=3).micro_batches(1, 1, 1) == a.micro_batches(1, 1, 1)


def test_no_shuffle_keeps_file_order_every_epoch():
    planner = StepPlanner(LENGTHS, 8, 1, 1, seed=3, shuffle=False)
    assert planner.step_pairs(0, 1) == list(range(8, 16)) == planner.step_pairs(2, 1)


def test_remainder_dropped_or_own_step_and_too_few_pairs():
    planner = StepPlanner(list(range(1, 20)), 8, 2, 2, seed=0)  # 19 = 8 + 8 + 3, and 3 < 4 micro-batches
    assert (
        planner.steps_per_epoch == 2 and planner.pairs_in_step(0, 1) == 8 and planner.dropped_per_epoch == 3
    )
    assert planner.step_pairs(0, 0) + planner.step_pairs(0, 1) != planner.step_pairs(
        1, 0
    ) + planner.step_pairs(1, 1)
    planner = StepPlanner(list(range(1, 22)), 8, 2, 2, seed=0)  # 21 = 8 + 8 + 5: a 5-pair last step
    assert (
        planner.steps_per_epoch == 3 and planner.pairs_in_step(0, 2) == 5 and planner.dropped_per_epoch == 0
    )
    with pytest.raises(ValueError, match="cannot fill"):
        StepPlanner([5, 5, 5], 8, 2, 2, seed=0)


@pytest.mark.parametrize("world, micro", [(1, 1), (1, 4), (2, 2), (3, 1), (2, 3)])
def test_no_micro_batch_exceeds_micro_batch_pairs(world, micro):
    for steps in (1, 2, 3):
        global_pairs = world * micro * steps
        accum = global_pairs // (world * micro)
        for n in range(world * accum, 5 * global_pairs + 3):
            planner = StepPlanner([1] * n, global_pairs, world, accum, seed=n)
            seen = []
            for step in range(planner.steps_per_epoch):
                plan = planner.step_plan(0, step)
                assert all(1 <= len(mb) <= micro for rank in plan for mb in rank), (n, step)
                seen += [i for rank in plan for mb in rank for i in mb]
            assert len(set(seen)) == len(seen) == n - planner.dropped_per_epoch
            assert planner.dropped_per_epoch < world * accum


def test_token_budget_bins_are_balanced():
    lengths = [100, 90, 80, 10, 10, 10, 5, 5]
    accum = token_budget_grad_accum(lengths, 8, 2, 100, seed=0)
    assert accum == 2  # 310 tokens / (2 ranks × 100) → 2, and longest-first dealing fits
    plan = StepPlanner(lengths, 8, 2, accum, seed=0, micro_batch_tokens=100).step_plan(0, 0)
    loads = sorted(sum(lengths[i] for i in micro) for rank in plan for micro in rank)
    assert loads == [40, 80, 90, 100]


def test_token_budget_adds_micro_batches_until_none_exceeds_it():
    """[70, 50, 40, 40], budget 100, one rank: 200 tokens / 100 → 2 micro-batches, but longest-first gives
    70+40 = 110 and 50+40 = 90; with 3: 70, 50, 40+40 = 80 — so 3."""
    assert token_budget_grad_accum([70, 50, 40, 40], 4, 1, 100, seed=0, shuffle=False) == 3
    with pytest.raises(ValueError, match=r"micro_batch_tokens 60 is below the longest pair \(70 tokens"):
        token_budget_grad_accum([70, 50, 40, 40], 4, 1, 60, seed=0)


def test_token_budget_starts_from_the_planned_steps_not_the_heaviest_possible():
    """Steps of 2 pairs, unshuffled. [60, 10], [60, 10]: each step holds 70 ≤ 100 → 1 micro-batch, though
    the two longest pairs together (120) would not fit one. [10, 10], [60, 60]: the second step → 2."""
    assert token_budget_grad_accum([60, 10, 60, 10], 2, 1, 100, seed=0, shuffle=False) == 1
    assert token_budget_grad_accum([10, 10, 60, 60], 2, 1, 100, seed=0, shuffle=False) == 2


def test_token_budget_error_when_one_pair_per_rank_still_overflows():
    """3 pairs of 100 over 2 ranks: at most 1 micro-batch per rank (global // world), so one holds 200."""
    with pytest.raises(ValueError, match="even 1 micro-batches per rank leave one over the budget"):
        token_budget_grad_accum([100, 100, 100], 3, 2, 100, seed=0)


@pytest.mark.parametrize("n, world, global_pairs", [(19, 1, 8), (37, 2, 8), (64, 2, 16), (101, 3, 12)])
def test_no_micro_batch_exceeds_the_token_budget(n, world, global_pairs):
    rng = random.Random(n)
    lengths = [rng.randint(10, 200) for _ in range(n)]
    for budget in (200, 260, 450, 1000):
        accum = token_budget_grad_accum(lengths, global_pairs, world, budget, seed=1, epochs=3)
        planner = StepPlanner(lengths, global_pairs, world, accum, seed=1, micro_batch_tokens=budget)
        loads = [sum(lengths[i] for i in micro) for epoch in range(3) for step in range(planner.steps_per_epoch)
                 for rank in planner.step_plan(epoch, step) for micro in rank]  # fmt: skip
        assert max(loads) <= budget, (n, world, budget, accum)
