"""Row formats, decided per source, with a chat template whose end of turn is not EOS: exact ids.

The tokenizer is word-level with special tokens, so every id below is derived by hand from VOCAB:
"<s><|start|>user<|sep|>hi<|eot|>" is [1, 3, 7, 4, 11, 5], and so on.
"""

from __future__ import annotations

import json

import pytest

from rainbowpo.config import load_config
from rainbowpo.data.formats import detect_format
from rainbowpo.data.tokenize import RowSettings, load_examples, tokenize_row

SPECIAL = ["<pad>", "<s>", "</s>", "<|start|>", "<|sep|>", "<|eot|>", "<unk>"]
WORDS = "user assistant system tool hi there yes no more ok think call lookup why because".split()
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}  # <s>=1, </s>=2 (EOS), <|eot|>=5 (end of turn)

#: Llama-3-like: BOS written by the template, each turn ends with <|eot|> (not EOS); reasoning_content and
#: tool_calls rendered; with enable_thinking false, assistant turns (and the generation prompt) open with
#: an empty "think <|sep|>" block, as Qwen3's template does.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m.role }}<|sep|>"
    "{% if m.role == 'assistant' and m.reasoning_content is defined %}think {{ m.reasoning_content }} <|sep|>"
    "{% elif m.role == 'assistant' and enable_thinking is defined and not enable_thinking %}think <|sep|>{% endif %}"
    "{{ m.content }}{% if m.tool_calls is defined %}{% for t in m.tool_calls %} call {{ t.function.name }}"
    "{% endfor %}{% endif %}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|sep|>"
    "{% if enable_thinking is defined and not enable_thinking %}think <|sep|>{% endif %}{% endif %}"
)
#: Renders the generation prompt with a "think" block the finished turn does not have: breaks the prefix.
BROKEN = TEMPLATE.replace(
    "{% if add_generation_prompt %}<|start|>assistant<|sep|>",
    "{% if add_generation_prompt %}<|start|>assistant<|sep|>think ",
)


def word_tokenizer(template: str = TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(SPECIAL)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def bot(text, **fields):
    return {"role": "assistant", "content": text, **fields}


PROMPT = [1, 3, 7, 4, 11, 5, 3, 8, 4]  # <s> <|start|> user <|sep|> hi <|eot|> <|start|> assistant <|sep|>
YES, NO = [13, 5], [14, 5]  # yes <|eot|> / no <|eot|>: the template's end of turn, once, no EOS (2)

SHAPES = {
    "standard": ({"prompt": "hi there", "chosen": "yes", "rejected": "no"}, [11, 12], [13, 2], [14, 2]),
    "conversational": ({"prompt": [user("hi")], "chosen": [bot("yes")], "rejected": [bot("no")]}, PROMPT, YES, NO),
    "conversational, string responses": ({"prompt": [user("hi")], "chosen": "yes", "rejected": "no"}, PROMPT, YES, NO),
    "conversational, responses repeat the prompt": (
        {"prompt": [user("hi")], "chosen": [user("hi"), bot("yes")], "rejected": [user("hi"), bot("no")]},
        PROMPT, YES, NO,
    ),
    # ultrafeedback_binarized / llama3-ultrafeedback-armorm: string prompt, conversations repeating it, extras
    "string prompt + conversations": (
        {"prompt": "hi", "prompt_id": "abc", "score_chosen": 8.0, "messages": [user("hi"), bot("yes")],
         "chosen": [user("hi"), bot("yes")], "rejected": [user("hi"), bot("no")]},
        PROMPT, YES, NO,
    ),
    "string prompt + assistant turns": ({"prompt": "hi", "chosen": [bot("yes")], "rejected": [bot("no")]}, PROMPT, YES, NO),
    "implicit": ({"chosen": [user("hi"), bot("yes")], "rejected": [user("hi"), bot("no")]}, PROMPT, YES, NO),
    "multi-turn prompt": (
        {"prompt": [user("hi"), bot("ok"), user("why")], "chosen": [bot("because")], "rejected": [bot("no")]},
        PROMPT + [16, 5, 3, 7, 4, 20, 5, 3, 8, 4], [21, 5], NO,
    ),
    "implicit multi-turn": (
        {"chosen": [user("hi"), bot("ok"), user("why"), bot("because")],
         "rejected": [user("hi"), bot("ok"), user("why"), bot("no")]},
        PROMPT + [16, 5, 3, 7, 4, 20, 5, 3, 8, 4], [21, 5], NO,
    ),
    # fields beyond role/content reach the template: a tool call, the tool's answer, reasoning_content
    "tool calls + reasoning": (
        {"prompt": [user("hi")], "rejected": [bot("no")],
         "chosen": [bot("", tool_calls=[{"type": "function", "function": {"name": "lookup"}}]),
                    {"role": "tool", "content": "there"}, bot("yes", reasoning_content="because")]},
        PROMPT, [18, 19, 5, 3, 10, 4, 12, 5, 3, 8, 4, 17, 21, 4, 13, 5], NO,
    ),
}  # fmt: skip

FORMAT_OF = {"standard": "standard", "implicit": "implicit", "implicit multi-turn": "implicit",
             "string prompt + conversations": "implicit", "string prompt + assistant turns": "implicit"}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, rows, tok, mode="preference", **data):
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    over = ["model.path=x", f"data.train={src}", f"train.mode={mode}"] + [
        f"data.{k}={v}" for k, v in data.items()
    ]
    cfg = load_config(None, over)
    return load_examples(cfg.data, cfg.data.train, tok, mode, 0)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_gives_exact_ids(tmp_path, tok, shape):
    row, prompt, chosen, rejected = SHAPES[shape]
    fmt = FORMAT_OF.get(shape, "conversational")
    assert detect_format(row, "preference") == fmt
    ids = tokenize_row(tok, row, RowSettings("preference", fmt))
    assert ids == {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
    # through the file loader (datasets fills absent message fields with None: they must not reach the template)
    (ex,), summary = load(tmp_path, [row], tok)
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (prompt, chosen, rejected)
    assert summary.formats == {f"data.train[0] rows.jsonl: {fmt}": 1}
    assert f"data.train[0] rows.jsonl: {fmt} (1 rows)" in summary.format()


def test_end_of_turn_is_the_templates_once_not_eos(tok):
    _, _, chosen, _ = SHAPES["conversational"]
    assert chosen[-1] == 5 and tok.eos_token_id == 2 and 2 not in chosen
    # a template writing no end-of-turn token gets EOS appended, once
    bare = word_tokenizer("{% for m in messages %}{{ m.content }} {% endfor %}")
    row = SHAPES["conversational"][0]
    assert tokenize_row(bare, row, RowSettings("preference", "conversational")) == {
        "prompt_ids": [11], "chosen_ids": [13, 2], "rejected_ids": [14, 2]
    }  # fmt: skip


def test_chat_template_kwargs_reach_the_template(tmp_path, tok):
    row = SHAPES["conversational"][0]
    (ex,), _ = load(tmp_path, [row], tok, chat_template_kwargs="{enable_thinking: false}")
    assert ex.prompt_ids == PROMPT + [17, 4]  # the generation prompt's empty think block
    assert ex.chosen_ids == YES and ex.rejected_ids == NO  # ... is not repeated in the response


def test_template_that_breaks_the_prefix_is_one_clear_error(tmp_path):
    row = SHAPES["conversational"][0]
    with pytest.raises(ValueError) as err:
        load(tmp_path, [row], word_tokenizer(BROKEN))
    text = str(err.value)
    assert "\n" not in text and "rows.jsonl row 1" in text and "does not start with the prompt" in text
    assert "part at token 9" in text


def test_sft_rows(tmp_path, tok):
    rows = [{"messages": [user("hi"), bot("yes")]}, {"prompt": [user("hi")], "completion": [bot("yes")]},
            {"prompt": "hi", "completion": "yes"}]  # fmt: skip
    (a, b, c), summary = load(tmp_path, rows, tok, mode="sft")
    assert (a.prompt_ids, a.completion_ids) == (PROMPT, YES) == (b.prompt_ids, b.completion_ids)
    assert (c.prompt_ids, c.completion_ids) == ([11], [13, 2])
    assert summary.formats == {"data.train[0] rows.jsonl: sft": 3}


def test_formats_decided_per_source(tmp_path, tok):
    std, conv = SHAPES["standard"][0], SHAPES["string prompt + conversations"][0]
    a, b = write_jsonl(tmp_path / "a.jsonl", [std]), write_jsonl(tmp_path / "b.jsonl", [conv, conv])
    cfg = load_config(None, ["model.path=x", f"data.train=[{a}, {b}]"])
    exs, summary = load_examples(cfg.data, cfg.data.train, tok, "preference", 0)
    assert len(exs) == 3 and exs[1].prompt_ids == PROMPT
    assert summary.formats == {"data.train[0] a.jsonl: standard": 1, "data.train[1] b.jsonl: implicit": 2}


def test_prompt_limit_defaults_to_half_of_max_length(tmp_path, tok):
    cfg = load_config(None, ["model.path=x", "data.train=x.jsonl", "data.max_length=512"])
    assert cfg.data.max_prompt_length is None and cfg.data.prompt_limit() == 256
    assert (
        load_config(
            None, ["model.path=x", "data.train=x.jsonl", "data.max_prompt_length=7"]
        ).data.prompt_limit()
        == 7
    )
    row = SHAPES["multi-turn prompt"][0]  # a 19-token prompt, 2-token responses
    (ex,), summary = load(tmp_path, [row], tok, max_length=12)
    assert ex.prompt_ids == [1] + SHAPES["multi-turn prompt"][1][-5:]  # BOS + the last 6 - 1 tokens
    assert summary.prompt_limit == 6 and "prompt limit 6 tokens" in summary.format()
