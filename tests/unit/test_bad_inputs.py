"""A catalogue of bad inputs: each fails with the exact error type and one clear line naming what is
wrong, where (file, row, key) and what to do — never a KeyError/TypeError from deep inside a library.

Sections: config YAML and overrides, objective ranges, data sources and rows, truncation and batching,
DeepSpeed configs, checkpoints and resume, the reference cache, and the data-prep reward functions.
No distributed init, no model launch; tiny tokenizers are trained on the fly.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager

import pytest
import torch

from data_prep.common import checked_reward, load_function, parse_shard, prompt_ids_of, read_jsonl, write_part
from data_prep.score import make_scorer, score
from data_prep.select import select
from rainbowpo import checkpoint as ckpt
from rainbowpo import reference
from rainbowpo.config import ConfigError, load_config
from rainbowpo.data.sampler import StepPlanner
from rainbowpo.data.tokenize import load_examples
from rainbowpo.engine import assemble_ds_config, load_causal_lm, load_ds_preset
from rainbowpo.objective import ObjectiveConfig

BASE = ["model.path=/m", "data.train=p.jsonl"]
WORDS = "alpha beta gamma one two red blue sort".split()


@contextmanager
def fails(exc_type: type, match: str):
    """Exactly `exc_type` (not a subclass, not a library error), `match` in a one-line message, no chained traceback."""
    with pytest.raises(exc_type, match=match) as info:
        yield info
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__}: {err}"
    assert "\n" not in str(err), f"message is not one line: {err}"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), (
        "a library traceback is chained to the message"
    )


# ----------------------------------------------------------------------------- config: YAML and overrides


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  path: x\n data: [\n")
    with fails(ConfigError, r"bad\.yaml: line 3, column 2 malformed YAML"):
        load_config(path)


def test_yaml_tab_indent_names_line(tmp_path):
    path = write(tmp_path / "tab.yaml", "model:\n\tpath: x\n")
    with fails(ConfigError, r"tab\.yaml: line 2, column 1 malformed YAML: found character '\\t'"):
        load_config(path)


def test_yaml_duplicate_key_is_an_error_not_last_wins(tmp_path):
    path = write(
        tmp_path / "dup.yaml", "model: {path: x}\ndata: {train: a.jsonl}\ntrain:\n  lr: 1\n  lr: 2\n"
    )
    with fails(ConfigError, r"dup\.yaml: line 5, column 3 malformed YAML: duplicate key 'lr'"):
        load_config(path)


def test_yaml_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- model\n- data\n")
    with fails(ConfigError, r"list\.yaml: the top level must be a mapping of sections, got list"):
        load_config(path)


def test_config_file_not_found(tmp_path):
    with fails(ConfigError, "config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_empty_yaml_names_missing_sections(tmp_path):
    with fails(ConfigError, re.escape("config: missing required key(s) ['model', 'data']")):
        load_config(write(tmp_path / "empty.yaml", ""))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key train.lrr; did you mean train.lr?"),
        ("objectiv.beta=1", "unknown key objectiv; did you mean objective?"),
        ("data.max_len=8", "unknown key data.max_len; did you mean data.max_length?"),
        ("train.zzz=1", "unknown key train.zzz; valid keys: mode, global_batch_pairs"),
        ("model.dtype=bf61", "model.dtype: must be one of ['fp32', 'bf16', 'fp16'], got 'bf61' (did you mean bf16?)"),
        ("reference.mode=offline", "reference.mode: must be one of ['auto', 'online', 'cached', 'none'], got 'offline' (did you mean online?)"),
    ],
)  # fmt: skip
def test_unknown_key_or_choice_says_did_you_mean(override, message):
    with fails(ConfigError, re.escape(message)):
        load_config(None, BASE + [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=one", "train.epochs: expected int, got 'one' (str)"),
        ("train.epochs=1.5", "train.epochs: expected int, got 1.5 (float)"),
        ("train.lr=true", "train.lr: expected float, got True (bool)"),
        ("data.packing=yes please", "data.packing: expected bool, got 'yes please' (str)"),
        ("train.adam_betas=[0.9]", "train.adam_betas: expected a list of 2 numbers, got [0.9]"),
        ("train=[1]", "train: expected a mapping, got [1]"),
        ("data.train=[5]", "data.train[0]: expected a mapping, got 5"),
        (
            "data.train=[{path: a.jsonl, columns: [q]}]",
            "data.train[0].columns: expected a mapping, got ['q']",
        ),
    ],
)
def test_wrong_type_names_key_and_value(override, message):
    with fails(ConfigError, re.escape(message)):
        load_config(None, BASE + [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train", "override 'train': expected key=value, e.g. objective.beta=5"),
        ("train.lr=[1,", "override 'train.lr=[1,': the value is not valid YAML"),
        ("model.path.x=1", "override 'model.path.x=1': path is not a section"),
    ],
)
def test_malformed_override(override, message):
    with fails(ConfigError, re.escape(message)):
        load_config(None, BASE + [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.path="], "model.path: is required (a Hugging Face model folder), got ''"),
        (["data.train=[]"], "data.train: needs at least one source, got []"),
        (["train.lr=0"], "train.lr: must be > 0, got 0.0"),
        (["train.micro_batch_pairs=0"], "train.micro_batch_pairs: must be >= 1, got 0"),
        (["train.warmup_ratio=1"], "train.warmup_ratio: must be in [0, 1), got 1.0"),
        (["output.keep_last=0"], "output.keep_last: must be >= 1, got 0"),
        (
            ["data.max_prompt_length=4096"],
            "data.max_prompt_length: must be in (0, data.max_length), got 4096",
        ),
        (["data.share_prompt=true", "data.packing=false"], "data.share_prompt: needs data.packing: true"),
        (["data.train=[{path: a.jsonl, weight: 0}]"], "data source a.jsonl: weight: must be > 0, got 0.0"),
        (
            ["data.format=sft"],
            "data.format: sft rows do not fit train.mode: preference; use data.format: auto",
        ),
        (["data.format=standard", "train.mode=sft"], "data.format: standard rows do not fit train.mode: sft"),
    ],
)
def test_out_of_range_config_fields(overrides, message):
    with fails(ConfigError, re.escape(message)):
        load_config(None, BASE + overrides)  # later overrides win


def test_missing_model_path_in_yaml(tmp_path):
    path = write(tmp_path / "nomodel.yaml", "model: {dtype: bf16}\ndata: {train: a.jsonl}\n")
    with fails(ConfigError, re.escape("model.path: is required (a Hugging Face model folder)")):
        load_config(path)


# ----------------------------------------------------------------------------- objective ranges


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.beta=-1", "objective.beta must be > 0, got -1.0"),
        ("objective.beta=.nan", "objective.beta: expected a finite number, got nan"),
        ("objective.mix_alpha=1.5", "objective.mix_alpha must be in [0, 1], got 1.5"),
        ("objective.label_smoothing=0.5", "objective.label_smoothing must be in [0, 0.5), got 0.5"),
        ("objective.dispersion=0", "objective.dispersion must be > 0, got 0.0"),
        ("objective.sft_weight=-0.1", "objective.sft_weight must be >= 0, got -0.1"),
        (
            "objective.link=logit",
            "objective.link must be one of ['hinge', 'logistic', 'squared'], got 'logit'",
        ),
        ("objective.preset=kto", "objective.preset: unknown preset 'kto'; choose one of"),
    ],
)
def test_objective_out_of_range_via_config(override, message):
    with fails(ConfigError, re.escape(message)):
        load_config(None, BASE + [override])


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(beta=0.0), "objective.beta must be > 0, got 0.0"),
        (dict(beta="5"), "objective.beta: expected a finite number, got '5'"),
        (dict(margin=math.inf), "objective.margin: expected a finite number, got inf"),
        (dict(mix_alpha=-0.1), "objective.mix_alpha must be in [0, 1], got -0.1"),
        (dict(label_smoothing=True), "objective.label_smoothing: expected a finite number, got True"),
    ],
)
def test_objective_config_rejects_bad_fields(fields, message):
    with fails(ValueError, re.escape(message)):
        ObjectiveConfig(**fields)


def test_objective_preset_unknown_override_field():
    with fails(ValueError, re.escape("objective: unknown field(s) ['betta']; fields are")):
        ObjectiveConfig.from_preset("dpo", betta=1.0)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["reference.mode=none"], "objective.mix_alpha > 0"),
        (["reference.mode=none", "objective.preset=mallows_dpo", "objective.mix_alpha=0"], "objective.contextual_scaling"),
    ],
)  # fmt: skip
def test_reference_none_but_objective_needs_one(overrides, field):
    with fails(ConfigError, re.escape(f"reference.mode: none, but {field} needs a reference model; set reference.mode to online or cached")):  # fmt: skip
        load_config(None, BASE + overrides)


def test_global_batch_not_divisible_by_world_times_micro():
    cfg = load_config(None, BASE + ["train.global_batch_pairs=64", "train.micro_batch_pairs=4"])
    with fails(ConfigError, re.escape("train.global_batch_pairs=64 is not divisible by world size 3 × train.micro_batch_pairs=4; pick a multiple of 12")):  # fmt: skip
        cfg.train.grad_accum(3)


def test_too_few_examples_for_ranks_and_micro_batches():
    with fails(ValueError, re.escape("3 examples cannot fill 2 ranks × 2 micro-batches: add data or lower the batch/world size")):  # fmt: skip
        StepPlanner([5, 5, 5], 8, 2, 2, seed=0)


# ----------------------------------------------------------------------------- data: sources and rows


STANDARD = {"prompt": "sort alpha beta", "chosen": "one two", "rejected": "red"}


def msgs(role: str, content) -> list[dict]:
    return [{"role": role, "content": content}]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, rows, tok, mode="preference", name="rows.jsonl", eval_rows=None, **data):
    over = ["model.path=x", f"data.train={write_rows(tmp_path / name, rows)}"]
    if eval_rows is not None:
        over.append(f"data.eval={write_rows(tmp_path / 'eval.jsonl', eval_rows)}")
    cfg = load_config(None, over + [f"data.{k}={v}" for k, v in data.items()] + [f"train.mode={mode}"])
    sources = cfg.data.eval if eval_rows is not None else cfg.data.train
    return load_examples(cfg.data, sources, tok, mode, 0)


def load_path(path, tok):
    cfg = load_config(None, ["model.path=x", f"data.train={path}"])
    return load_examples(cfg.data, cfg.data.train, tok, "preference", 0)


def test_tokenizer_without_eos(tmp_path, toks):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toks["bpe_dir"])
    tok.eos_token = None
    with fails(ValueError, re.escape("the tokenizer has no EOS token: set tokenizer.eos_token")):
        load(tmp_path, [STANDARD], tok)


@pytest.mark.parametrize("text", ["", "\n\n  \n"], ids=["zero_bytes", "blank_lines"])
def test_empty_jsonl_source(tmp_path, toks, text):
    with fails(ValueError, r"data source .*empty\.jsonl: the file is empty \(no rows\)"):
        load_path(write(tmp_path / "empty.jsonl", text), toks["bpe"])


def test_sources_without_rows(tmp_path, toks):
    import datasets

    with fails(ValueError, r"data source .*header\.csv: the file has no rows"):
        load_path(write(tmp_path / "header.csv", "prompt,chosen,rejected\n"), toks["bpe"])
    with fails(ValueError, r"data source .*empty\.json: the file has no rows"):
        load_path(write(tmp_path / "empty.json", "[]"), toks["bpe"])
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(tmp_path / "saved"))
    with fails(
        ValueError, r"saved: cannot load this save_to_disk folder \(.*\); is it empty or half written\?"
    ):
        load_path(str(tmp_path / "saved"), toks["bpe"])


@pytest.mark.parametrize(
    "text, message",
    [
        (json.dumps(STANDARD) + '\n{"prompt": "a", chosen\n', r"bad\.jsonl: line 2 is not valid JSON \(Expecting property name"),
        (json.dumps(STANDARD) + "\n[1, 2]\n", r"bad\.jsonl: line 2 is not a JSON object \(got list\)"),
    ],
)  # fmt: skip
def test_malformed_jsonl_names_the_line(tmp_path, toks, text, message):
    with fails(ValueError, "data source .*" + message):
        load_path(write(tmp_path / "bad.jsonl", text), toks["bpe"])


def test_malformed_json_file(tmp_path, toks):
    with fails(ValueError, r"bad\.json: not valid JSON \(Expecting property name .* at line 1, column 2\)"):
        load_path(write(tmp_path / "bad.json", "{oops"), toks["bpe"])


def test_source_missing_file_unsupported_type_plain_folder_and_split(tmp_path, toks):
    import datasets

    with fails(ValueError, r"data source .*missing\.jsonl: file not found"):
        load_path(str(tmp_path / "missing.jsonl"), toks["bpe"])
    with fails(ValueError, re.escape("rows.txt: unsupported file type '.txt'; use one of ['.jsonl', '.json', '.parquet', '.csv']")):  # fmt: skip
        load_path(write(tmp_path / "rows.txt", "hello\n"), toks["bpe"])
    (tmp_path / "folder").mkdir()
    with fails(
        ValueError, "folder: a folder, but not one written by datasets.save_to_disk; give a file path"
    ):
        load_path(str(tmp_path / "folder"), toks["bpe"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list([STANDARD])}).save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(None, ["model.path=x", f"data.train=[{{path: {tmp_path / 'dd'}, split: test}}]"])
    with fails(ValueError, re.escape("dd: no split 'test'; set split: to one of ['train']")):
        load_examples(cfg.data, cfg.data.train, toks["bpe"], "preference", 0)


def test_column_mapping_names_a_missing_column(tmp_path, toks):
    path = write_rows(tmp_path / "rows.jsonl", [STANDARD])
    cfg = load_config(None, ["model.path=x", f"data.train=[{{path: {path}, columns: {{prompt: question}}}}]"])
    with fails(
        ValueError,
        re.escape("data.train[0] rows.jsonl: column mapping names ['question'], not in the columns"),
    ):
        load_examples(cfg.data, cfg.data.train, toks["bpe"], "preference", 0)


BAD_ROWS = {
    "missing_column": ({"prompt": "a", "rejected": "b"}, "missing column 'chosen' (columns: ['prompt', 'rejected'])"),
    "null_column": ({"prompt": None, "chosen": "a", "rejected": "b"}, "missing column 'prompt' (columns: ['chosen', 'rejected'])"),
    "not_a_string": ({"prompt": "a", "chosen": 3, "rejected": "b"}, "'chosen' must be a string, got int"),
    "empty_prompt": ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    "empty_response": ({"prompt": "a", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    "chosen_equals_rejected": ({"prompt": "a", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    "message_without_content": ({"prompt": [{"role": "user"}], "chosen": msgs("assistant", "x"), "rejected": msgs("assistant", "y")},
                                "'prompt' must be a non-empty list of {role, content} messages; message 0 is {'role': 'user'}"),
    "message_content_not_string": ({"prompt": msgs("user", 1), "chosen": msgs("assistant", "x"), "rejected": msgs("assistant", "y")},
                                   "'prompt' must be a non-empty list of {role, content} messages; message 0 is {'role': 'user', 'content': 1}"),
    "messages_not_a_list": ({"prompt": msgs("user", "q"), "chosen": {"role": "assistant", "content": "x"}, "rejected": msgs("assistant", "y")},
                            "'chosen' must be a non-empty list of {role, content} messages, got {'role': 'assistant', 'content': 'x'}"),
    "empty_message_response": ({"prompt": msgs("user", "q"), "chosen": msgs("assistant", " "), "rejected": msgs("assistant", "y")},
                               "'chosen': the final assistant turn has no content"),
    "implicit_no_common_prompt": ({"chosen": msgs("user", "x"), "rejected": msgs("user", "y")},
                                  "'chosen' and 'rejected' share no leading messages, so they hold no prompt (implicit format"),
}  # fmt: skip


@pytest.mark.parametrize("row, message", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_names_file_row_and_fix(tmp_path, toks, row, message):
    with fails(ValueError, re.escape(f"data.train[0] rows.jsonl row 2: {message}")):  # fmt: skip
        load(tmp_path, [good_row_like(row), row], toks["bpe_chat"])


def good_row_like(row: dict) -> dict:
    """A good first row of the bad row's format (a source holds one format, decided by its first row)."""
    if isinstance(row.get("prompt"), list):
        return {
            "prompt": msgs("user", "q"),
            "chosen": msgs("assistant", "x"),
            "rejected": msgs("assistant", "y"),
        }
    if "prompt" not in row and isinstance(row.get("chosen"), list):
        return {
            "chosen": msgs("user", "q") + msgs("assistant", "x"),
            "rejected": msgs("user", "q") + msgs("assistant", "y"),
        }
    return STANDARD


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": msgs("user", "x")}, "'messages' must hold a prompt and a final assistant turn"),
        ({"messages": []}, "'messages' must be a non-empty list of {role, content} messages, got []"),
        (
            {"prompt": msgs("user", "x"), "completion": msgs("assistant", 5)},
            "'completion' must be a non-empty list",
        ),
        (STANDARD, "missing column 'completion' (columns: ['chosen', 'prompt', 'rejected'])"),
    ],
    ids=["no_assistant_turn", "empty_messages", "completion_content_not_string", "preference_row_in_sft"],
)
def test_bad_sft_row(tmp_path, toks, row, message):
    good = {"prompt": "sort alpha", "completion": "one"}
    with fails(ValueError, re.escape(f"data.train[0] rows.jsonl row 2: {message}")):
        load(tmp_path, [good, row], toks["bpe_chat"], mode="sft")


def test_bad_eval_row_names_the_eval_source(tmp_path, toks):
    with fails(ValueError, re.escape("data.eval[0] eval.jsonl row 1: 'prompt' is empty")):
        load(tmp_path, [STANDARD], toks["bpe"], eval_rows=[{"prompt": "", "chosen": "a", "rejected": "b"}])


def test_bad_rows_skipped_and_counted_by_kind(tmp_path, toks):
    rows = [STANDARD] + [row for row, _ in BAD_ROWS.values()]
    exs, summary = load(tmp_path, rows, toks["bpe_chat"], on_bad_row="skip")
    assert len(exs) == 1 and summary.read == 1 + len(BAD_ROWS)
    assert summary.skipped == {  # message rows in this standard source (first row) are mixed formats
        "missing_column": 2, "not_a_string": 1, "empty": 2, "chosen_equals_rejected": 1, "mixed_formats": 5,
    }  # fmt: skip
    assert "skipped bad rows {" in summary.format()


def test_all_rows_bad_with_skip_is_an_error(tmp_path, toks):
    rows = [row for row, _ in BAD_ROWS.values()]
    with fails(
        ValueError,
        r"no usable rows in \[.*rows\.jsonl'\]: data: 11 rows read, 0 kept.*skipped bad rows \{.*fix the rows",
    ):
        load(tmp_path, rows, toks["bpe_chat"], on_bad_row="skip")


def test_conversational_rows_without_chat_template_fail_even_with_skip(tmp_path, toks):
    row = {"prompt": msgs("user", "q"), "chosen": msgs("assistant", "x"), "rejected": msgs("assistant", "y")}
    message = (
        "data.train[0] rows.jsonl row 1 is conversational but the tokenizer has no chat template; add one"
    )
    for on_bad_row in ("error", "skip"):
        with fails(ValueError, re.escape(message)):
            load(tmp_path, [row, row], toks["bpe"], on_bad_row=on_bad_row)


# ----------------------------------------------------------------------------- data: truncation

# max_prompt_length < max_length always leaves >= 1 response token; a pair whose responses only differ
# past the cut has nothing left to prefer: it is dropped and counted, and an error if every pair goes.
SAME_START = {"prompt": "alpha", "chosen": "one two one", "rejected": "one two red"}


def test_pair_with_nothing_left_after_truncation_is_dropped_and_counted(tmp_path, toks):
    exs, summary = load(tmp_path, [STANDARD, SAME_START], toks["bpe"], max_length=3, max_prompt_length=1)
    assert len(exs) == 1 and summary.read == 2 and summary.dropped == {"identical_after_truncation": 1}


def test_every_pair_dropped_by_truncation_is_an_error(tmp_path, toks):
    with fails(
        ValueError, r"no usable rows .* dropped \{'identical_after_truncation': 1\}.*raise data\.max_length"
    ):
        load(tmp_path, [SAME_START], toks["bpe"], max_length=3, max_prompt_length=1)


# ----------------------------------------------------------------------------- DeepSpeed configs


@pytest.fixture(scope="module")
def train_section():
    return load_config(None, BASE + ["train.global_batch_pairs=8", "train.micro_batch_pairs=2"]).train


@pytest.mark.parametrize(
    "preset, path",
    [
        ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
        ({"train_micro_batch_size_per_gpu": "auto"}, "train_micro_batch_size_per_gpu"),
    ],
)  # fmt: skip
def test_ds_config_auto_values(train_section, preset, path):
    with fails(ConfigError, re.escape(f"deepspeed.config: {path} is 'auto'; write a number")):
        assemble_ds_config(preset, train_section, "fp32", 1, 4)


@pytest.mark.parametrize(
    "key, value, ours",
    [
        ("train_micro_batch_size_per_gpu", 4, "2"),
        ("gradient_accumulation_steps", 1, "4"),
        ("train_batch_size", 64, "8"),
        ("gradient_clipping", 5.0, "1.0"),
        ("bf16", {"enabled": True}, "{'enabled': False}"),
    ],
)
def test_ds_config_conflicting_keys(train_section, key, value, ours):
    message = f"deepspeed.config sets {key}={value!r} but the training config gives {ours}; remove it from the DeepSpeed JSON"  # fmt: skip
    with fails(ConfigError, re.escape(message)):
        assemble_ds_config({key: value}, train_section, "fp32", 1, 4)


@pytest.mark.parametrize("key", ["optimizer", "scheduler"])
def test_ds_config_optimizer_keys(train_section, key):
    with fails(ConfigError, re.escape(f"deepspeed.config: remove '{key}'; the optimizer and schedule come from train.*")):  # fmt: skip
        assemble_ds_config({key: {"type": "AdamW"}}, train_section, "fp32", 1, 4)


def test_nonexistent_ds_preset_lists_the_presets(tmp_path):
    with fails(ConfigError, re.escape("deepspeed.config: 'zero9' is neither a preset ['ref_zero3_offload', 'zero0', 'zero2', 'zero3', 'zero3_offload'] nor a JSON file")):  # fmt: skip
        load_ds_preset("zero9")
    with fails(ConfigError, r"deepspeed.config: '.*missing\.json' is neither a preset"):
        load_ds_preset(str(tmp_path / "missing.json"))
    with fails(ConfigError, r"deepspeed.config: .*bad\.json is not valid JSON \(Expecting"):
        load_ds_preset(write(tmp_path / "bad.json", "{"))


def test_model_path_not_found():
    cfg = load_config(None, BASE)
    with fails(ConfigError, re.escape("model path not found: 'no_such_model' (a local Hugging Face folder or a hub name)")):  # fmt: skip
        load_causal_lm("no_such_model", cfg, {"zero_optimization": {"stage": 0}}, "eager")


@pytest.mark.parametrize("path", ["/no/such/model", "./runs/no_such_model"])
def test_absolute_or_dotted_model_path_not_found(path):
    with fails(ConfigError, re.escape(f"model path not found: {path!r}")):
        load_causal_lm(path, load_config(None, BASE), {"zero_optimization": {"stage": 0}}, "eager")


# ----------------------------------------------------------------------------- checkpoints and resume


@pytest.fixture
def ckpt_root(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step-000004"
    folder.mkdir(parents=True)
    (folder / ckpt.MARKER).write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 4}))
    return tmp_path / "run"


@pytest.mark.parametrize(
    "text, message",
    [
        ("garbage{", r"cannot read trainer_state\.json \(Expecting value: line 1 column 1"),
        ("[4]", r"trainer_state\.json has no integer 'step' >= 0 \(got \[4\]\)"),
        ('{"step": "four"}', r"trainer_state\.json has no integer 'step' >= 0"),
        (None, r"cannot read trainer_state\.json \(\[Errno 2\]"),
    ],
    ids=["garbage", "not_an_object", "step_not_int", "missing"],
)
def test_corrupt_trainer_state(ckpt_root, text, message):
    folder = ckpt_root / "checkpoints" / "step-000004"
    if text is None:
        (folder / "trainer_state.json").unlink()
    else:
        (folder / "trainer_state.json").write_text(text)
    with fails(ValueError, f"corrupt checkpoint .*step-000004: {message}"):
        ckpt.read_trainer_state(str(folder))


def test_corrupt_rng_state(ckpt_root):
    folder = ckpt_root / "checkpoints" / "step-000004"
    (folder / "rng").mkdir()
    (folder / "rng" / "rank0.pt").write_bytes(b"junk")
    with fails(
        ValueError, r"corrupt checkpoint .*step-000004: cannot restore rng/rank0\.pt .*delete the file"
    ):
        ckpt.read_rank_state(str(folder), 0)


def test_resume_path_that_is_not_a_complete_checkpoint(ckpt_root):
    root = str(ckpt_root / "checkpoints")
    with fails(
        ValueError, r"output.resume: .*nope does not exist; give a step-\* checkpoint folder, auto or never"
    ):
        ckpt.resolve_resume(str(ckpt_root / "nope"), root)
    partial = ckpt_root / "checkpoints" / "step-000008"
    partial.mkdir()  # an interrupted save: shards but no marker
    with fails(ValueError, r"step-000008 is not a complete checkpoint \(no COMPLETE marker inside\) \(an interrupted save\)"):  # fmt: skip
        ckpt.resolve_resume(str(partial), root)
    with fails(ValueError, r"run is not a complete checkpoint .*; did you mean .*checkpoints/step-000004\?"):
        ckpt.resolve_resume(str(ckpt_root), root)  # the output dir instead of a checkpoint in it
    assert ckpt.resolve_resume("auto", root).endswith("step-000004")  # auto never picks the partial one


# ----------------------------------------------------------------------------- reference cache


@pytest.fixture
def cache(tmp_path):
    folder = str(tmp_path / "ref_cache" / "abc")
    empty = torch.zeros(0, 2, dtype=torch.float64)
    reference._write_cache(
        folder, "abc", {"train": (torch.zeros(3, 2, dtype=torch.float64), None), "eval": (empty, None)}
    )
    return folder


def test_reference_cache_wrong_key_or_rows(cache):
    with fails(ValueError, r"reference cache .*abc was built for other weights/data \(key abc rows 3, expected xyz rows 3\); delete it"):  # fmt: skip
        reference._read_cache(cache, "xyz", 3, False)
    with fails(ValueError, r"\(key abc rows 3, expected abc rows 5\)"):
        reference._read_cache(cache, "abc", 5, False)
    with fails(ValueError, r"reference cache .*abc has no entropies but contextual scaling needs them"):
        reference._read_cache(cache, "abc", 3, True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: open(os.path.join(f, "reference.safetensors"), "w").write("junk"), r"is unreadable \(SafetensorError: .*\); delete the folder"),
        (lambda f: open(os.path.join(f, "meta.json"), "w").write("[1]"), r"is unreadable \(ValueError: meta.json holds a list, not an object\)"),
        (lambda f: os.remove(os.path.join(f, "meta.json")), r"is unreadable \(FileNotFoundError: .*meta\.json'\); delete the folder"),
        (lambda f: reference.save_file({"logp": torch.zeros(2, 2)}, os.path.join(f, "reference.safetensors")), r"abc: logp table is \(2, 2\), expected \(3, 2\)"),
        (lambda f: reference.save_file({"x": torch.zeros(3, 2)}, os.path.join(f, "reference.safetensors")), r"abc: logp table is missing, expected \(3, 2\)"),
    ],
    ids=["corrupt_tensors", "meta_not_object", "meta_missing", "wrong_shape", "no_logp"],
)  # fmt: skip
def test_reference_cache_corrupt(cache, damage, message):
    damage(cache)
    with fails(ValueError, "reference cache .*" + message):
        reference._read_cache(cache, "abc", 3, False)


# ----------------------------------------------------------------------------- data prep: reward functions


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data_prep.tasks.sort_task.reward", "expected module:function, e.g. data_prep.tasks.sort_task:reward"),
        ("data_prep.tasks.sort_task:", "expected module:function"),
        ("no_such_module_xyz:reward", "cannot import no_such_module_xyz (ModuleNotFoundError: No module named 'no_such_module_xyz')"),
        ("data_prep.tasks.sort_task:nope", "data_prep.tasks.sort_task has no function 'nope'"),
        ("math:pi", "math.pi is a float, not a function"),
    ],
)  # fmt: skip
def test_bad_reward_function_spec(spec, message):
    with fails(ValueError, re.escape(f"reward function {spec!r}: {message}")):
        load_function(spec)


@pytest.mark.parametrize(
    "source, message",
    [
        ("raise RuntimeError('boom at import')\n", "(RuntimeError: boom at import)"),
        ("def reward(:\n", "(SyntaxError: invalid syntax"),
    ],
)
def test_reward_module_that_fails_to_import(tmp_path, monkeypatch, source, message):
    (tmp_path / "rp_broken_reward.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with fails(ValueError, re.escape(f"reward function 'rp_broken_reward:reward': cannot import rp_broken_reward {message}")):  # fmt: skip
        load_function("rp_broken_reward:reward")


def _raises(prompt, completion, metadata):
    return 1 / 0


@pytest.mark.parametrize(
    "fn, message",
    [
        (_raises, "raised on prompt id 7 candidate 2: ZeroDivisionError('division by zero')"),
        (
            lambda p, c, m: float("nan"),
            "returned nan for prompt id 7 candidate 2; it must return a finite float",
        ),
        (lambda p, c, m: -math.inf, "returned -inf for prompt id 7 candidate 2"),
        (lambda p, c, m: "1.0", "returned '1.0' for prompt id 7 candidate 2"),
        (lambda p, c, m: None, "returned None for prompt id 7 candidate 2"),
        (lambda p, c, m: True, "returned True for prompt id 7 candidate 2"),
        (lambda p, c, m: torch.tensor(0.5), "returned tensor(0.5000) for prompt id 7 candidate 2"),
    ],
    ids=["raises", "nan", "inf", "string", "none", "bool", "tensor"],
)
def test_reward_function_bad_result(fn, message):
    with fails(ValueError, re.escape(f"reward function m:f {message}")):
        checked_reward(fn, "m:f", {"id": "7", "prompt": "p"}, 2, "text")


def test_reward_numpy_float_is_a_number():
    np = pytest.importorskip("numpy")
    assert checked_reward(lambda p, c, m: np.float32(0.5), "m:f", {"id": "7", "prompt": "p"}, 0, "t") == 0.5


def test_reward_row_without_prompt_is_not_blamed_on_the_function():
    with fails(
        ValueError, re.escape("prompt id 3: the row has neither 'prompt' nor 'messages' (columns: ['id'])")
    ):
        checked_reward(lambda p, c, m: 1.0, "m:f", {"id": "3"}, 0, "t")


def test_scorer_choice_and_missing_reward_model(tmp_path):
    for reward, model in ((None, None), ("a:b", "/m")):
        with fails(
            ValueError, re.escape("give exactly one of --reward module:function or --reward-model PATH")
        ):
            make_scorer(reward, model)
    with fails(ValueError, r"--reward-model .*nope: folder not found"):
        make_scorer(None, str(tmp_path / "nope"))


def test_score_rows_without_candidates(tmp_path):
    cands, out = str(tmp_path / "cands"), str(tmp_path / "out")
    scorer = make_scorer("data_prep.tasks.sort_task:reward", None)
    with fails(ValueError, r"no candidates in .*cands: run data_prep.generate first"):
        score(cands, out, scorer)
    write_part(cands, "0", [{"id": "0", "prompt": "p"}])
    with fails(
        ValueError, r"cands: row 1 \(id 0\) has no \['candidates'\]; was it written by data_prep.generate"
    ):
        score(cands, out, scorer)


@pytest.mark.parametrize(
    "row, kwargs, message",
    [
        ({"candidates": ["a", "b"], "rewards": [1.0]}, {}, r"prompt id 0 has 2 candidates but rewards \[1\.0\]; re-run data_prep.score"),
        ({"candidates": ["a", "b"]}, {}, r"row 1 \(id 0\) has no \['rewards'\]; was it written by data_prep.score\?"),
        ({"candidates": ["a", "b"], "rewards": [1.0, 0.0]}, {"method": "rsoo"}, r"select: unknown method 'rsoo'; choose one of"),
        ({"candidates": ["a", "b"], "rewards": [1.0, 0.0]}, {"beta": 0.0}, r"select: rso needs --beta-rso > 0 and --k >= 2"),
        ({"candidates": ["a", "b"], "rewards": [1.0, 0.0]}, {"k": 1}, r"rso needs .* got beta 0.5, k 1"),
    ],
    ids=["rewards_length", "no_rewards", "unknown_method", "rso_beta_zero", "rso_k_one"],
)  # fmt: skip
def test_select_bad_scored_rows_and_arguments(tmp_path, row, kwargs, message):
    write_part(str(tmp_path / "scored"), "0", [{"id": "0", "prompt": "p", **row}])
    args = {"method": "rso", "k": 4, "beta": 0.5, "min_gap": 0.0, "seed": 0, **kwargs}
    with fails(ValueError, message):
        select(str(tmp_path / "scored"), str(tmp_path / "pairs.jsonl"), **args)


def test_data_prep_files_and_flags(tmp_path):
    path = write(tmp_path / "prompts.jsonl", '{"prompt": "a"}\n{bad\n')
    with fails(ValueError, r"prompts\.jsonl line 2: not valid JSON \(Expecting property name"):
        read_jsonl(path)
    with fails(ValueError, re.escape("duplicate prompt id '1': ids must be unique")):
        prompt_ids_of([{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"}])
    with fails(ValueError, re.escape("--shard must look like i/n (e.g. 0/2), got 'a'")):
        parse_shard("a")
    with fails(ValueError, re.escape("--shard 2/2: need 0 <= i < n")):
        parse_shard("2/2")


# ----------------------------------------------------------------------------- known gaps (engine.py)


def test_ds_config_json_not_an_object(tmp_path):
    with fails(ConfigError, "must be a JSON object"):
        load_ds_preset(write(tmp_path / "list.json", "[1]"))


def test_ds_config_zero_optimization_not_an_object(train_section):
    with fails(ConfigError, "zero_optimization"):
        assemble_ds_config({"zero_optimization": 3}, train_section, "fp32", 1, 4)


def test_ds_config_auto_inside_a_list(train_section):
    with fails(ConfigError, "'auto'"):
        assemble_ds_config({"x": [{"y": "auto"}]}, train_section, "fp32", 1, 4)


def test_model_folder_without_config(tmp_path):
    with fails(ConfigError, "cannot load model"):
        load_causal_lm(str(tmp_path), load_config(None, BASE), {"zero_optimization": {"stage": 0}}, "eager")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pairing": "swiss"}, r"select: unknown pairing 'swiss'; choose one of \['first_round', 'tournament'\]"),
        ({"method": "gumbel_topk", "beta": -1.0}, r"select: gumbel_topk needs --beta-rso > 0 and --k >= 2 \(a pair\), got beta -1.0"),
        ({"beta": float("nan")}, r"select: rso needs --beta-rso > 0 and --k >= 2 \(a pair\), got beta nan, k 4"),
    ],
    ids=["unknown_pairing", "gumbel_beta_negative", "rso_beta_nan"],
)  # fmt: skip
def test_select_bad_pairing_and_sampler_arguments(tmp_path, kwargs, message):
    write_part(
        str(tmp_path / "scored"),
        "0",
        [{"id": "0", "prompt": "p", "candidates": ["a", "b"], "rewards": [1.0, 0.0]}],
    )
    args = {"method": "rso", "k": 4, "beta": 0.5, "min_gap": 0.0, "seed": 0, **kwargs}
    with fails(ValueError, message):
        select(str(tmp_path / "scored"), str(tmp_path / "pairs.jsonl"), **args)


# ----------------------------------------------------------------------------- data prep: reward models


@pytest.fixture(scope="module")
def rm_folders(tmp_path_factory):
    """A causal-LM checkpoint, a two-label classifier and a one-label reward model on a tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rainbowpo.tiny import build_tiny_model, train_sentencepiece

    root = tmp_path_factory.mktemp("rms")
    tok = train_sentencepiece(
        [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20, str(root / "tok")
    )
    build_tiny_model(tok, str(root / "causal_lm"), hidden=16, layers=1, heads=2, kv_heads=1)
    size = {"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    for name, labels in (("two_labels", 2), ("rm", 1)):
        LlamaForSequenceClassification(LlamaConfig(**size, num_labels=labels)).save_pretrained(
            str(root / name)
        )
        tok.save_pretrained(str(root / name))
    build_tiny_model(tok, str(root / "relabelled_lm"), hidden=16, layers=1, heads=2, kv_heads=1)
    config = json.loads((root / "relabelled_lm" / "config.json").read_text())  # says classifier, has no head
    config.update(
        architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}
    )
    (root / "relabelled_lm" / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize(
    "folder, message",
    [
        ("causal_lm", "LlamaForCausalLM has no score head (a language model, not a reward model); give an AutoModelForSequenceClassification checkpoint with num_labels = 1"),
        ("two_labels", "a classifier with num_labels = 2; a reward model has one output (num_labels = 1) or returns .score"),
        ("missing", "folder not found"),
    ],
)  # fmt: skip
def test_reward_model_without_a_score_head(rm_folders, folder, message):
    with fails(ValueError, re.escape(f"--reward-model {rm_folders / folder}: {message}")):
        make_scorer(None, str(rm_folders / folder), device="cpu")


def test_reward_model_config_without_head_weights(rm_folders):
    scorer = make_scorer(None, str(rm_folders / "relabelled_lm"), device="cpu")  # the config looks right
    message = "1 weight(s) are not in the checkpoint (score.weight, …), so the score head would be random"
    with fails(ValueError, re.escape(f"--reward-model {rm_folders / 'relabelled_lm'}: {message}")):
        scorer.score_pairs([("alpha", "beta")])  # weights load on first use


def test_reward_model_whose_output_is_not_one_number(rm_folders):
    from transformers import AutoModelForSequenceClassification

    from data_prep.score import RewardModelScorer

    model = AutoModelForSequenceClassification.from_pretrained(str(rm_folders / "two_labels"))
    scorer = RewardModelScorer(
        "two-label", model=model, tokenizer=make_scorer(None, str(rm_folders / "rm")).tokenizer
    )
    message = (
        "--reward-model two-label: the model returns logits of shape (1, 2); a reward model gives one number"
    )
    with fails(ValueError, re.escape(message)):
        scorer.score_pairs([("alpha", "beta")])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"max_length": -3}, "--max-length must be >= 1, got -3"),
        ({"dtype": "fp8"}, "--dtype 'fp8': choose one of auto, bfloat16, float16, float32"),
    ],
)  # fmt: skip
def test_reward_model_bad_options(rm_folders, options, message):
    with fails(ValueError, re.escape(message)):
        make_scorer(None, str(rm_folders / "rm"), device="cpu", **options)


# ----------------------------------------------------------------------------- data: formats (issue 15)

CONV_OK = {
    "chosen": msgs("user", "q") + msgs("assistant", "x"),
    "rejected": msgs("user", "q") + msgs("assistant", "y"),
}
FORMAT_ROWS = {
    "no_shared_prefix": (CONV_OK, {"chosen": msgs("user", "q") + msgs("assistant", "x"), "rejected": msgs("user", "other") + msgs("assistant", "y")},
                         "'chosen' and 'rejected' share no leading messages, so they hold no prompt (implicit format: both must start with the same prompt turns)"),
    "last_turn_not_assistant": (CONV_OK, {"chosen": msgs("user", "q") + msgs("assistant", "x") + msgs("user", "more"), "rejected": CONV_OK["rejected"]},
                                "'chosen': the last message is a 'user' turn; a response must end with an assistant turn"),
    "user_turn_in_response": (CONV_OK, {"chosen": msgs("user", "q") + msgs("assistant", "a") + msgs("user", "b") + msgs("assistant", "x"),
                                        "rejected": msgs("user", "q") + msgs("assistant", "a") + msgs("user", "c") + msgs("assistant", "y")},
                              "'chosen': the response after the prompt holds a 'user' turn; only the final assistant turn(s) may follow the prompt"),
    "mixed_formats_conversational_in_standard": (STANDARD, {"prompt": msgs("user", "q"), "chosen": msgs("assistant", "x"), "rejected": msgs("assistant", "y")},
                                                 "'prompt' is a message list but this source's rows are standard ('prompt' a string; decided by its first row or data.format): one source holds one format"),
    "mixed_formats_string_in_implicit": (CONV_OK, STANDARD,
                                         "'chosen' is a string but this source's rows are implicit ('chosen' a message list;"),
    "string_prompt_disagrees_with_conversations": ({"prompt": "q", **CONV_OK}, {"prompt": "not q", **CONV_OK},
                                                   "'prompt' ('not q') is not the last user turn that 'chosen' and 'rejected' share ('q'): the prompt column and the conversations disagree"),
}  # fmt: skip


@pytest.mark.parametrize("first, row, message", FORMAT_ROWS.values(), ids=FORMAT_ROWS.keys())
def test_bad_format_row_names_file_row_and_key(tmp_path, toks, first, row, message):
    with fails(ValueError, re.escape(f"data.train[0] rows.jsonl row 2: {message}")):
        load(tmp_path, [first, row], toks["bpe_chat"])


def test_chat_template_that_breaks_the_prompt_prefix(tmp_path, toks):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toks["bpe_dir"])
    tok.chat_template = (  # the generation prompt opens a think block the finished turn does not have
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\nthink{% endif %}"
    )
    message = "data.train[0] rows.jsonl row 1: the chat template renders prompt + response so that it does not start with the prompt rendered with add_generation_prompt=True: they part at token"  # fmt: skip
    with fails(ValueError, re.escape(message) + ".*check data.chat_template_kwargs"):
        load(tmp_path, [CONV_OK], tok)


def test_chat_template_kwargs_must_be_a_mapping():
    with fails(ConfigError, re.escape("data.chat_template_kwargs: expected a mapping, got 'thinking'")):
        load_config(None, BASE + ["data.chat_template_kwargs=thinking"])


def test_max_prompt_length_not_below_max_length():
    with fails(ConfigError, re.escape("data.max_prompt_length: must be in (0, data.max_length), got 512")):
        load_config(None, BASE + ["data.max_length=512", "data.max_prompt_length=512"])


def test_reference_cache_eval_table_is_its_own(tmp_path):
    from types import SimpleNamespace

    folder = str(tmp_path / "ref_cache" / "k")
    train, evals = (
        torch.arange(6, dtype=torch.float64).reshape(3, 2),
        -torch.arange(4, dtype=torch.float64).reshape(2, 2),
    )
    reference._write_cache(folder, "k", {"train": (train, None), "eval": (evals, None)})
    ref = reference._read_cache(folder, "k", 3, False, eval_rows=2)
    batch = SimpleNamespace(row_ids=torch.tensor([1]), input_ids=torch.zeros(1))
    assert ref.stats(batch, "train")[0].tolist() == [2.0, 3.0] and ref.stats(batch, "eval")[0].tolist() == [
        -2.0,
        -3.0,
    ]
    with fails(ValueError, re.escape(f"reference cache {folder} was built for other weights/data")):
        reference._read_cache(folder, "k", 3, False, eval_rows=5)
