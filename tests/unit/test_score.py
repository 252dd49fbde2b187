"""Reward-model scoring: a custom `.score` model loaded with trust_remote_code, a stock one-label classifier,
a tokenizer without pad token, batching, padding sides, truncation, sharding and the closing summary.

Expected rewards are computed independently: the model's own layers run on one unpadded sequence whose ids
are written out by hand from the template, and the reward is read at its last position.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from data_prep import score
from data_prep.common import read_parts, write_part

WORDS = "alpha beta gamma delta one two three four red green blue sort list answer yes no".split()
# Llama-3-like: the template writes BOS itself and ends every turn with EOS, and the tokenizer has no pad
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MODELING = '''
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class TinyRewardConfig(LlamaConfig):
    model_type = "tiny_reward_test"


@dataclass
class TinyRewardOutput(ModelOutput):
    score: torch.Tensor | None = None


class TinyRewardModel(LlamaPreTrainedModel):
    """Like ArmoRM: returns .score, read at the token before the first pad id (right padding)."""

    config_class = TinyRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.head = torch.nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        return TinyRewardOutput(score=self.head(hidden[torch.arange(len(hidden)), last]))
'''

PAIRS = [
    ("alpha beta", "one two three four red green"),
    ("sort list: three one", "one three"),
    ("gamma", "delta yes"),
    ("red green blue yes no answer alpha beta", "no"),
    ("blue", "alpha beta gamma delta one two three four"),
    ("alpha beta", "one two three four red green"),  # a repeat: same reward wherever it lands
    ("list answer", "yes yes yes yes yes yes yes yes yes yes yes"),
]


def tiny_config(cls, tok, **extra):
    return cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from rainbowpo.tiny import train_sentencepiece

    folder = tmp_path_factory.mktemp("rm_tok")
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(9)) for i in range(200)]
    tok = train_sentencepiece(texts, str(folder), vocab_size=300, chat_template=TEMPLATE)
    tok.pad_token = None
    tok.save_pretrained(str(folder))
    return folder


def load_tok(folder, padding_side="right"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), padding_side=padding_side, trust_remote_code=True)


@pytest.fixture(scope="module")
def custom_rm(tok_dir, tmp_path_factory):
    """A folder with modeling_tiny_rm.py + auto_map, loaded only with trust_remote_code; pad id = EOS."""
    folder = tmp_path_factory.mktemp("custom_rm")
    (folder / "modeling_tiny_rm.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("modeling_tiny_rm_local", folder / "modeling_tiny_rm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    tok = load_tok(tok_dir)
    cfg = tiny_config(module.TinyRewardConfig, tok, pad_token_id=tok.eos_token_id)
    cfg.architectures = ["TinyRewardModel"]
    cfg.auto_map = {"AutoConfig": "modeling_tiny_rm.TinyRewardConfig",
                    "AutoModelForSequenceClassification": "modeling_tiny_rm.TinyRewardModel"}  # fmt: skip
    torch.manual_seed(0)
    model = module.TinyRewardModel(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = cfg.auto_map
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def chat_ids(tok, prompt: str, response: str) -> list[int]:
    """The template's text written out by hand (one BOS, each turn closed by EOS), tokenized as is."""
    text = f"<s><|im_start|>user\n{prompt}</s><|im_start|>assistant\n{response}</s>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id
    return ids


@torch.no_grad()
def custom_reference(model, ids: list[int]) -> float:
    """The custom model's head on its own trunk's last position of one unpadded sequence."""
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
    return model.head(hidden[0, -1]).item()


def rm_scorer(folder, **kw):
    return score.make_scorer(None, str(folder), trust_remote_code=True, device="cpu", **kw)


def test_custom_score_model_batched_equals_unbatched_and_reference(custom_rm, tok_dir):
    one = rm_scorer(custom_rm, batch_size=1)
    assert one.model.dtype == torch.float32 and one.tokenizer.pad_token is None
    expected = [custom_reference(one.model, chat_ids(one.tokenizer, p, r)) for p, r in PAIRS]
    assert one.score_pairs(PAIRS) == pytest.approx(expected, abs=1e-5)
    assert len({round(x, 4) for x in expected}) == len(PAIRS) - 1  # distinct, but the repeated pair
    for batch_size in (3, 4, 32):
        for side in ("right", "left"):
            scorer = rm_scorer(custom_rm, batch_size=batch_size)
            scorer.tokenizer = load_tok(
                custom_rm, padding_side=side
            )  # padding is ours: the side must not matter
            assert scorer.score_pairs(PAIRS) == pytest.approx(expected, abs=1e-5), (batch_size, side)
    assert one.truncated == 0


def test_custom_model_without_trust_remote_code_is_one_line(custom_rm):
    with pytest.raises(ValueError) as err:
        score.make_scorer(None, str(custom_rm), device="cpu")
    assert str(err.value).count("\n") == 0 and "add --trust-remote-code" in str(err.value)


def test_truncation_keeps_the_first_tokens_and_is_counted(custom_rm):
    scorer = rm_scorer(custom_rm, batch_size=4, max_length=60)
    ids = [chat_ids(scorer.tokenizer, p, r) for p, r in PAIRS]
    long = sum(len(i) > 60 for i in ids)
    assert 0 < long < len(PAIRS)
    expected = [custom_reference(scorer.model, i[:60]) for i in ids]
    assert scorer.score_pairs(PAIRS) == pytest.approx(expected, abs=1e-5)
    assert scorer.truncated == long


@pytest.fixture(scope="module")
def stock_rm(tok_dir, tmp_path_factory):
    """AutoModelForSequenceClassification from a tiny LlamaConfig(num_labels=1), no pad id, no chat template."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("stock_rm")
    tok = load_tok(tok_dir)
    tok.chat_template = None
    torch.manual_seed(1)
    LlamaForSequenceClassification(tiny_config(LlamaConfig, tok, num_labels=1)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_stock_classifier_reads_logits_and_concatenates_without_template(stock_rm):
    scorer = score.make_scorer(None, str(stock_rm), batch_size=3, device="cpu")
    tok = scorer.tokenizer
    assert not tok.chat_template and tok.pad_token is None and scorer.model.config.pad_token_id is None
    # the training stage's boundary: the prompt with BOS, then the response's own ids, no EOS
    ids = [[tok.bos_token_id, *tok(p, add_special_tokens=False).input_ids, *tok(r, add_special_tokens=False).input_ids]
           for p, r in PAIRS]  # fmt: skip
    with torch.no_grad():  # batch of one, no pad id: the model reads the last position itself
        expected = [scorer.model(input_ids=torch.tensor([i])).logits[0, 0].item() for i in ids]
    assert scorer.score_pairs(PAIRS) == pytest.approx(expected, abs=1e-5)
    assert [scorer.encode(p, r) for p, r in PAIRS] == ids
    half = score.make_scorer(None, str(stock_rm), batch_size=3, device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16  # --dtype; the rewards come back as floats near fp32's
    assert half.score_pairs(PAIRS) == pytest.approx(expected, abs=0.05)


def test_in_process_model_and_conversational_rows(custom_rm):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(custom_rm), trust_remote_code=True)
    scorer = score.RewardModelScorer(model=model, tokenizer=load_tok(custom_rm), batch_size=2, device="cpu")
    rows = [
        {"id": "a", "prompt": "alpha beta", "candidates": ["one two three four red green", "no"]},
        {"id": "b", "messages": [{"role": "user", "content": "gamma"}], "candidates": ["delta yes"]},
    ]
    got = scorer.score_rows(rows)
    tok = scorer.tokenizer
    expected = [
        [custom_reference(model, chat_ids(tok, "alpha beta", c)) for c in rows[0]["candidates"]],
        [custom_reference(model, chat_ids(tok, "gamma", "delta yes"))],
    ]
    assert [len(g) for g in got] == [2, 1]
    assert got[0] == pytest.approx(expected[0], abs=1e-5) and got[1] == pytest.approx(expected[1], abs=1e-5)


def write_candidates(folder, n_prompts=9):
    rows = [{"id": f"p{i}", "prompt": PAIRS[i % len(PAIRS)][0],
             "candidates": [PAIRS[(i + j) % len(PAIRS)][1] for j in range(3)]} for i in range(n_prompts)]  # fmt: skip
    write_part(str(folder), "0", rows[:5])
    write_part(str(folder), "1", rows[5:])
    return rows


def test_stage_sharded_equals_one_process_and_summarizes(custom_rm, tmp_path, capsys):
    rows = write_candidates(tmp_path / "cands")
    scorer = rm_scorer(custom_rm, batch_size=4, max_length=60)
    whole = score.score(str(tmp_path / "cands"), str(tmp_path / "one"), scorer, chunk=2)
    line = capsys.readouterr().out
    assert (whole.prompts, whole.candidates) == (9, 27)
    by_id = {r["id"]: r["rewards"] for r in read_parts(str(tmp_path / "one"))}
    assert sorted(by_id) == sorted(r["id"] for r in rows)
    flat = [x for r in by_id.values() for x in r]
    assert (min(flat), max(flat)) == (min(whole.rewards), max(whole.rewards))
    assert "score: 9 prompts, 27 candidates scored" in line and "truncated" in line
    assert whole.truncated == sum(
        len(scorer.encode(r["prompt"], c)) > 60 for r in rows for c in r["candidates"]
    )
    assert f"min {min(flat):.4g} mean" in line and f"max {max(flat):.4g}" in line

    shards = [
        score.score(str(tmp_path / "cands"), str(tmp_path / "two"), scorer, 2, f"{i}/2") for i in (0, 1)
    ]
    assert sum(s.prompts for s in shards) == 9 and all(s.prompts for s in shards)
    two = {r["id"]: r["rewards"] for r in read_parts(str(tmp_path / "two"))}
    assert two.keys() == by_id.keys()
    for key in by_id:
        assert two[key] == pytest.approx(by_id[key], abs=1e-5)
    again = score.score(
        str(tmp_path / "cands"), str(tmp_path / "two"), scorer, 2, "0/1"
    )  # resume: nothing left
    assert again.prompts == 0 and len(read_parts(str(tmp_path / "two"))) == 9


def test_cli_shards_by_launcher_rank_and_loads_lazily(custom_rm, tmp_path, monkeypatch, capsys):
    rows = write_candidates(tmp_path / "cands")
    scorer = rm_scorer(custom_rm)
    assert scorer._model is None and scorer.load() is scorer and scorer._model is not None
    argv = ["--candidates", str(tmp_path / "cands"), "--out", str(tmp_path / "scored"), "--reward-model",
            str(custom_rm), "--trust-remote-code", "--batch-size", "4", "--dtype", "float32"]  # fmt: skip
    for rank in (1, 0):  # as under `deepspeed --num_gpus 2 --module data_prep.score`
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        mine = [r["id"] for r in rows if score.shard_of(r["id"], 2) == rank]
        assert score.main(argv).prompts == len(mine) > 0
        assert f"score: {len(mine)} prompts, {3 * len(mine)} candidates scored" in capsys.readouterr().out
    assert sorted(r["id"] for r in read_parts(str(tmp_path / "scored"))) == sorted(r["id"] for r in rows)


def test_accelerator_device_and_dtype_without_gpu(monkeypatch):
    from data_prep.common import accelerator_device, default_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_device(3) == torch.device("cpu")
    assert default_dtype("cpu") == torch.float32 and default_dtype("cpu", "bf16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert accelerator_device() == torch.device("cuda", 1) and accelerator_device(0) == torch.device(
        "cuda", 0
    )
    assert default_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert default_dtype(torch.device("cuda", 1), "fp32") == torch.float32
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 but this process sees 2 CUDA device\(s\)"):
        accelerator_device()


# ----------------------------------------------------------------------------- evaluate: generate + score pieces
needs_engine = pytest.mark.skipif(
    not hasattr(__import__("data_prep.generate").generate, "HfEngine"),
    reason="data_prep.generate.HfEngine (the batched hf engine, branch i14-gen) is not merged yet",
)


@pytest.fixture(scope="module")
def policy(tok_dir, tmp_path_factory):
    from rainbowpo.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("policy")
    tok = load_tok(tok_dir)
    tok.pad_token = tok.convert_ids_to_tokens(0)
    build_tiny_model(tok, str(folder), hidden=32, layers=2, heads=4, kv_heads=2, seed=3)
    prompts = folder / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, (p, _) in enumerate(PAIRS))
    )
    return folder


@needs_engine
def test_evaluate_with_a_reward_model_scores_its_answers(policy, custom_rm, tmp_path, capsys):
    from data_prep import evaluate

    out = tmp_path / "eval.json"
    argv = ["--model", str(policy), "--prompts", str(policy / "prompts.jsonl"), "--reward-model", str(custom_rm),
            "--trust-remote-code", "--max-new-tokens", "6", "--batch-prompts", "3", "--batch-size", "5",
            "--temperature", "1.0", "--n", "2", "--out", str(out)]  # fmt: skip
    result = evaluate.main(argv)
    assert json.loads(out.read_text())["mean_reward"] == result["mean_reward"]
    assert (
        result["prompts"] == len(PAIRS) and result["samples_per_prompt"] == 2 and result["solve_rate"] is None
    )
    scorer = rm_scorer(custom_rm, batch_size=1)
    for item in result["answers"]:  # each answer's reward = the reward model on (prompt, answer) alone
        assert len(item["answers"]) == 2
        assert item["rewards"] == pytest.approx(
            scorer.score_pairs([(item["prompt"], a) for a in item["answers"]]), abs=1e-5
        )
    per_prompt = [sum(a["rewards"]) / 2 for a in result["answers"]]
    assert result["rewards"] == pytest.approx(per_prompt) and result["mean_reward"] == pytest.approx(
        sum(per_prompt) / len(PAIRS)
    )
    line = capsys.readouterr().out
    assert (
        f"of {len(PAIRS)} prompts, {2 * len(PAIRS)} answers scored, 0 skipped (too long), 0 truncated" in line
    )


@needs_engine
def test_evaluate_greedy_with_a_reward_function_does_not_depend_on_batching(policy, tmp_path):
    from data_prep import evaluate
    from data_prep.tasks import sort_task

    prompts = tmp_path / "sort.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in sort_task.make_prompts(5, seed=0)))

    def run(batch_prompts):
        return evaluate.evaluate(str(policy), str(prompts), "data_prep.tasks.sort_task:reward",
                                 max_new_tokens=4, batch_prompts=batch_prompts)  # fmt: skip

    one, four = run(1), run(4)
    assert [a["answers"] for a in one["answers"]] == [a["answers"] for a in four["answers"]]
    assert (
        one["solve_rate"] is not None
        and one["samples_per_prompt"] == 1
        and one["mean_reward"] == four["mean_reward"]
    )


# ----------------------------------------------------------------------------- --chat-template-kwargs
def think_template(generation: bool) -> str:
    """TEMPLATE with an empty think block when enable_thinking is false: in the generation prompt (a policy's,
    as Qwen3's) or in the assistant turn (a reward model's)."""
    off = "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    turn = "{% if m['role'] == 'assistant' %}" + off + "{% endif %}"
    return (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        + ("" if generation else turn)
        + "{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        + (off if generation else "")
        + "{% endif %}"
    )


def with_template(src, dst, template: str):
    """A copy of model folder src whose tokenizer has `template` as its chat template."""
    import shutil

    shutil.copytree(src, dst)
    tok = load_tok(dst)
    tok.chat_template = template
    tok.save_pretrained(str(dst))
    return dst


def test_reward_model_reads_with_the_chat_template_kwargs(custom_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = with_template(custom_rm, tmp_path / "rm", think_template(generation=False))
    rows = write_candidates(tmp_path / "cands", n_prompts=2)
    common = ["--candidates", str(tmp_path / "cands"), "--reward-model", str(rm), "--trust-remote-code"]
    score.main([*common, "--out", str(tmp_path / "plain")])
    score.main(
        [*common, "--out", str(tmp_path / "off"), "--chat-template-kwargs", '{"enable_thinking": false}']
    )
    model = AutoModelForSequenceClassification.from_pretrained(str(rm), trust_remote_code=True)
    tok = load_tok(rm)
    for name, opening in (("plain", ""), ("off", "<think></think>")):  # the template's text written by hand
        got = {r["id"]: r["rewards"] for r in read_parts(str(tmp_path / name))}
        for row in rows:
            expected = [
                custom_reference(model, chat_ids(tok, row["prompt"], opening + c)) for c in row["candidates"]
            ]
            assert got[row["id"]] == pytest.approx(expected, abs=1e-5)
    plain, off = (read_parts(str(tmp_path / name))[0]["rewards"] for name in ("plain", "off"))
    assert plain != pytest.approx(off, abs=1e-4)  # the think block really changed what the model read


@pytest.mark.parametrize("value", ["[1]", "false", "{enable_thinking: false}"])
def test_score_and_evaluate_refuse_chat_template_kwargs_that_are_no_json_object(value, capsys):
    from data_prep import evaluate

    for main, argv in (
        (score.main, ["--candidates", "c", "--out", "o"]),
        (evaluate.main, ["--model", "m", "--prompts", "p"]),
    ):
        with pytest.raises(SystemExit) as err:
            main([*argv, "--reward", "x:y", "--chat-template-kwargs", value])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.value.code == 2 and "error: argument --chat-template-kwargs: " in line
        assert ("not valid JSON" if "enable" in value else "expected a JSON object") in line


@needs_engine
def test_evaluate_renders_prompts_with_the_chat_template_kwargs(policy, tmp_path, monkeypatch):
    from data_prep import evaluate, generate
    from data_prep.tasks import sort_task

    model = with_template(policy, tmp_path / "policy", think_template(generation=True))
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": r["prompt"]}], "metadata": r["metadata"]}
            for i, r in enumerate(sort_task.make_prompts(3, seed=0))]  # fmt: skip
    prompts = tmp_path / "sort.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen, real = {}, generate.HfEngine.generate
    monkeypatch.setattr(
        generate.HfEngine, "generate", lambda self, jobs: seen.update(jobs) or real(self, jobs)
    )

    def prompt_ids_with(*flags) -> dict:
        seen.clear()
        evaluate.main(["--model", str(model), "--prompts", str(prompts), "--reward",
                       "data_prep.tasks.sort_task:reward", "--max-new-tokens", "3", *flags])  # fmt: skip
        return dict(seen)

    plain, off = prompt_ids_with(), prompt_ids_with("--chat-template-kwargs", '{"enable_thinking": false}')
    tok = load_tok(model)
    for row in rows:  # the template's text written out by hand: the template writes the BOS itself
        text = f"<s><|im_start|>user\n{row['messages'][0]['content']}</s><|im_start|>assistant\n"
        assert plain[row["id"]] == tok(text, add_special_tokens=False).input_ids
        assert off[row["id"]] == tok(text + "<think></think>", add_special_tokens=False).input_ids
