"""The batched hf engine: sharding does not change candidates, left padding is exact, long prompts are skipped."""

from __future__ import annotations

import json
import random

import pytest
import torch

from data_prep import generate
from data_prep.common import read_parts, write_part
from rainbowpo.data.render import prompt_ids

WORDS = "alpha beta gamma delta one two three four red green blue sort list answer yes no".split()
LONG = 7  # prompt p7 has 60 words


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from rainbowpo.tiny import build_tiny_model, train_sentencepiece

    ws = tmp_path_factory.mktemp("gen")
    rng = random.Random(1)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    tok = train_sentencepiece([text(10) for _ in range(400)], str(ws / "tok"), vocab_size=120)
    build_tiny_model(tok, str(ws / "model"), hidden=32, layers=2, heads=4, kv_heads=2, seed=0)
    rows = [{"id": f"p{i}", "prompt": text(60 if i == LONG else rng.randint(2, 9)), "metadata": {"i": i}}
            for i in range(10)]  # fmt: skip
    (ws / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws


def run(ws, out, *flags, shard=None) -> dict:
    argv = ["--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out), "--n", "3",
            "--max-new-tokens", "6", *flags]  # fmt: skip
    args = generate.parser().parse_args(argv)
    return generate.generate(args.model, args.prompts, args.out, args, shard)


def candidates(out) -> dict:
    return {r["id"]: r["candidates"] for r in read_parts(str(out))}


@pytest.mark.parametrize("batch", ["1", "3"])
def test_candidates_do_not_depend_on_sharding_or_part_size(ws, tmp_path, batch):
    one = run(ws, tmp_path / "one", "--batch-prompts", batch)
    run(ws, tmp_path / "two", "--batch-prompts", batch, "--chunk", "1", shard="0/2")
    run(ws, tmp_path / "two", "--batch-prompts", batch, "--chunk", "5", shard="1/2")
    got = candidates(tmp_path / "one")
    assert len(got) == 10 and one["skipped"] == 0 and all(len(c) == 3 for c in got.values())
    assert got == candidates(tmp_path / "two")
    assert len({tuple(c) for c in got.values()}) >= 8  # the prompts really were sampled differently
    row = next(r for r in read_parts(str(tmp_path / "one")) if r["id"] == "p2")
    assert row["metadata"] == {"i": 2} and row["sampler"]["batch_prompts"] == int(batch)
    assert row["sampler"]["dtype"] == "float32" and row["sampler"]["seed"] == 0  # "auto" on the CPU


def test_shards_take_whole_batches_in_file_order():
    rows = [{"id": str(i)} for i in range(7)]
    shard = lambda i, n: [[pos for pos, _ in b] for b in generate.shard_batches(rows, 3, i, n)]  # noqa: E731
    assert shard(0, 1) == [[0, 1, 2], [3, 4, 5], [6]]
    assert shard(0, 2) == [[0, 1, 2], [6]] and shard(1, 2) == [[3, 4, 5]]


def test_greedy_batches_equal_one_prompt_at_a_time(ws, tmp_path):
    """Left padding + attention mask: a prompt's greedy answer does not change with its batch mates."""
    run(ws, tmp_path / "b1", "--temperature", "0", "--batch-prompts", "1")
    run(ws, tmp_path / "b4", "--temperature", "0", "--batch-prompts", "4")
    single, batched = candidates(tmp_path / "b1"), candidates(tmp_path / "b4")
    assert single == batched and all(len(set(c)) == 1 for c in single.values())
    # and equal to plain `model.generate` on the prompt alone (no shared prefill cache, no padding)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ws / "model")
    model = AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32).eval()
    plain = {
        r["id"]: [plain_greedy(model, tok, r["prompt"])] * 3
        for r in map(json.loads, open(ws / "prompts.jsonl"))
    }
    assert plain == single


@torch.no_grad()
def plain_greedy(model, tok, prompt: str, max_new_tokens: int = 6) -> str:
    """Stock `model.generate` on one prompt (no batching, no shared prefill): the oracle of the test above."""
    ids = torch.tensor([prompt_ids(tok, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_too_long_prompt_is_skipped_counted_and_not_retried(ws, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ws / "model"))
    lengths = {
        r["id"]: len(prompt_ids(tok, r["prompt"])) for r in map(json.loads, open(ws / "prompts.jsonl"))
    }
    limit = lengths[f"p{LONG}"] + 6 - 1  # p7 + 6 new tokens is one over
    too_long = {pid for pid, n in lengths.items() if n + 6 > limit}
    assert f"p{LONG}" in too_long and len(too_long) < 10
    first = run(ws, tmp_path / "c", "--batch-prompts", "3", "--max-model-len", str(limit))
    assert first["skipped"] == len(too_long) and first["prompts"] == 10
    assert first["candidates"] == 3 * (10 - len(too_long))
    assert set(candidates(tmp_path / "c")) == set(lengths) - too_long
    assert {r["id"] for r in read_parts(str(tmp_path / "c" / "skipped"))} == too_long
    again = run(ws, tmp_path / "c", "--batch-prompts", "3", "--max-model-len", str(limit))
    assert again["prompts"] == 0  # the skipped ones are recorded, not re-generated on every restart


def test_resume_inside_a_batch_gives_the_uninterrupted_candidates(ws, tmp_path):
    run(ws, tmp_path / "full", "--batch-prompts", "3")
    reference = read_parts(str(tmp_path / "full"))
    write_part(str(tmp_path / "part"), "earlier", [r for r in reference if r["id"] in ("p1", "p4")])
    resumed = run(ws, tmp_path / "part", "--batch-prompts", "3")
    assert resumed["prompts"] == 8
    rows = read_parts(str(tmp_path / "part"))
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in reference)  # each prompt exactly once
    assert candidates(tmp_path / "part") == candidates(tmp_path / "full")


def test_cut_keeps_tokens_up_to_the_first_eos():
    engine = generate.HfEngine.__new__(generate.HfEngine)
    engine.eos_ids = {2}
    assert engine._cut(torch.tensor([5, 6, 2, 0, 0])) == [5, 6, 2]
    assert engine._cut(torch.tensor([5, 6, 7])) == [5, 6, 7]


def test_main_prints_one_summary_line(ws, tmp_path, capsys):
    argv = ["--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(tmp_path / "m"),
            "--n", "2", "--max-new-tokens", "4"]  # fmt: skip
    summary = generate.main(argv)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("generate: shard 0/1: 10 prompts, 20 candidates, 0 skipped (too long), ")
    assert 0 < summary["tokens"] <= 10 * 2 * 4 and "tok/s" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tensor-parallel-size", "2"], r"the hf engine runs one device per process; use --engine vllm"),
        (["--batch-prompts", "0"], r"must be >= 1"),
        (["--gpu-memory-utilization", "1.5"], r"must be in \(0, 1\]"),
    ],
)
def test_bad_settings_are_one_line(ws, tmp_path, flags, message):
    argv = [
        "--model",
        str(ws / "model"),
        "--prompts",
        str(ws / "prompts.jsonl"),
        "--out",
        str(tmp_path),
        *flags,
    ]
    with pytest.raises(SystemExit, match=message) as err:
        generate.main(argv)
    assert str(err.value).startswith("generate: error: ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, expected",
    [
        (1.0, 0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        (1.0, 2, 1.0, [0.625, 0.375, 0.0, 0.0]),  # the two largest, renormalised
        (1.0, 0, 0.7, [0.625, 0.375, 0.0, 0.0]),  # smallest set with mass >= 0.7: {0.5, 0.3}
        (
            2.0,
            0,
            1.0,
            [p**0.5 / 1.8657 for p in (0.5, 0.3, 0.15, 0.05)],
        ),  # ∝ p^(1/T): sum of the roots 1.8657
    ],
)
def test_sampler_frequencies_match_the_warped_softmax(temperature, top_k, top_p, expected):
    engine = generate.HfEngine.__new__(generate.HfEngine)
    engine.warpers = generate.sampling_warpers({"temperature": temperature, "top_k": top_k, "top_p": top_p})
    rows = 40_000
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(rows, 1)
    torch.manual_seed(0)
    counts = torch.bincount(engine._sample(logits), minlength=4).double() / rows
    for got, want in zip(counts.tolist(), expected):
        se = max((want * (1 - want) / rows) ** 0.5, 1e-9)
        assert abs(got - want) <= 4.5 * se + 1e-4 * (want == 0), (counts, expected)


# ----------------------------------------------------------------------------- --chat-template-kwargs
#: ChatML whose generation prompt opens an empty think block when enable_thinking is false (as Qwen3's does)
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_ws(ws, tmp_path_factory):
    """ws's model with THINK_TEMPLATE as its chat template, and conversational prompts."""
    import shutil

    from transformers import AutoTokenizer

    chat = tmp_path_factory.mktemp("chat")
    shutil.copytree(ws / "model", chat / "model")
    tok = AutoTokenizer.from_pretrained(str(chat / "model"))
    tok.chat_template = THINK_TEMPLATE
    tok.save_pretrained(str(chat / "model"))
    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": w}]} for i, w in enumerate(WORDS[:3])]
    (chat / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return chat


class RecordingEngine:
    """Stands in for the engine: keeps the prompt ids it is given, answers "x"."""

    skipped = tokens = 0

    def __init__(self):
        self.jobs = {}

    def generate(self, jobs):
        self.jobs.update(jobs)
        return [["x"] for _ in jobs]


def sampled_prompt_ids(chat_ws, out, monkeypatch, *flags) -> dict:
    engine = RecordingEngine()
    monkeypatch.setattr(generate, "make_engine", lambda *args: engine)
    run(chat_ws, out, *flags)
    return engine.jobs


def test_chat_template_kwargs_reach_the_prompt_rendering(chat_ws, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_ws / "model"))
    plain = sampled_prompt_ids(chat_ws, tmp_path / "a", monkeypatch)
    off = sampled_prompt_ids(
        chat_ws, tmp_path / "b", monkeypatch, "--chat-template-kwargs", '{"enable_thinking": false}'
    )
    on = sampled_prompt_ids(
        chat_ws, tmp_path / "c", monkeypatch, "--chat-template-kwargs", '{"enable_thinking": true}'
    )
    for i, word in enumerate(WORDS[:3]):  # the template's text written out by hand, one BOS added
        text = f"<|im_start|>user\n{word}<|im_end|>\n<|im_start|>assistant\n"
        assert plain[f"c{i}"] == tok(text).input_ids == on[f"c{i}"]
        assert off[f"c{i}"] == tok(text + "<think></think>").input_ids != plain[f"c{i}"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("[1, 2]", "expected a JSON object"),
        ("{enable_thinking: false}", "not valid JSON"),
        ('"x"', "expected a JSON object"),
    ],
)
def test_chat_template_kwargs_must_be_a_json_object(value, message, capsys):
    argv = ["--model", "m", "--prompts", "p", "--out", "o", "--chat-template-kwargs", value]
    with pytest.raises(SystemExit) as err:
        generate.parser().parse_args(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and f"error: argument --chat-template-kwargs: {message}" in lines[-1]
