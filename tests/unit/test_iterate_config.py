"""The iterate config: validated up front, one line per mistake naming the key and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep import iterate
from rainbowpo.config import ConfigError, build, read_tree

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def files(tmp_path) -> dict:
    (tmp_path / "sft").mkdir()
    for name in ("prep.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text('{"prompt": "sort: 3 1 2", "metadata": {"numbers": [3, 1, 2]}}\n')
    return {
        "model": {"path": str(tmp_path / "sft")},
        "prep": {"prompts": str(tmp_path / "prep.jsonl"), "reward": "data_prep.tasks.sort_task:reward"},
        "train": {
            "config": str(ROOT / "configs/tiny/rainbowpo_tiny.yaml"),
            "overrides": {"train.max_steps": 2},
        },
        "eval": {"prompts": str(tmp_path / "heldout.jsonl")},
        "output": {"dir": str(tmp_path / "run")},
    }


def write(tmp_path: Path, tree: dict) -> str:
    path = tmp_path / "iterate.yaml"
    path.write_text(json.dumps(tree))
    return str(path)


def error(tmp_path: Path, tree: dict, overrides: list[str] = ()) -> str:
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as exc:
        iterate.load_iterate_config(path, list(overrides))
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_a_valid_config_loads_with_defaults(tmp_path, files):
    cfg = iterate.load_iterate_config(write(tmp_path, files), ["iterate.rounds=3"])
    assert (cfg.iterate.rounds, cfg.iterate.reference, cfg.prep.method, cfg.prep.n) == (
        3,
        "initial",
        "rso",
        8,
    )
    assert cfg.train.overrides == {"train.max_steps": "2"}


def test_unknown_keys_name_the_key_the_file_and_a_guess(tmp_path, files):
    files["prep"]["temprature"] = 0.7
    assert error(tmp_path, files).endswith("unknown key prep.temprature; did you mean prep.temperature?")
    del files["prep"]["temprature"]
    files["evl"] = {}
    assert error(tmp_path, files).endswith("unknown key evl; did you mean eval?")
    files["resources"] = files.pop("evl")
    assert error(tmp_path, files).endswith(
        "unknown key resources; valid keys: model, prep, train, eval, iterate, output"
    )


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("n", "eight", "prep.n: expected int, got 'eight' (str)"),
        ("n", 0, "prep.n: must be >= 1, got 0"),
        ("method", "rsoo", "prep.method: must be one of ['rso', 'gumbel_topk', 'best_worst', 'all_pairs'], "
                           "got 'rsoo' (did you mean rso?)"),
        ("reward", "no_such_module:f", "prep.reward: reward function 'no_such_module:f': cannot import"),
        ("reward_model", "/models/rm", "give exactly one of prep.reward"),
        ("prompts", "/nowhere.jsonl", "prep.prompts: /nowhere.jsonl not found"),
        ("k", 1, "prep: rso needs k >= 2 and beta_rso > 0"),
    ],
)  # fmt: skip
def test_prep_mistakes(tmp_path, files, key, value, expected):
    files["prep"][key] = value
    assert expected in error(tmp_path, files)


def test_reference_choice_and_rounds(tmp_path, files):
    files["iterate"] = {"reference": "last"}
    assert "iterate.reference: must be one of ['initial', 'previous'], got 'last'" in error(tmp_path, files)
    files["iterate"] = {"rounds": 0}
    assert "iterate.rounds: must be >= 1, got 0" in error(tmp_path, files)


def test_training_overrides_are_checked_against_the_training_config(tmp_path, files):
    files["train"]["overrides"] = {"objective.bta": 5}
    message = error(tmp_path, files)
    assert "train.config" in message and "unknown key objective.bta; did you mean objective.beta?" in message
    files["train"]["overrides"] = {"model.path": "/elsewhere", "output.dir": "x"}
    assert "train.overrides: ['model.path', 'output.dir'] are set by the driver" in error(tmp_path, files)


def test_missing_sections_and_files(tmp_path, files):
    del files["eval"]
    assert "missing required key(s) ['eval']" in error(tmp_path, files)
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {path}"):
        iterate.load_iterate_config(str(path))


def test_main_prints_one_line_and_exits(tmp_path, files):
    files["prep"]["temprature"] = 0.7
    path = write(tmp_path, files)
    with pytest.raises(SystemExit) as exc:
        iterate.main([path, "--rounds", "2"])
    assert (
        exc.value.code == f"config error: {path}: unknown key prep.temprature; did you mean prep.temperature?"
    )


def test_round_overrides_follow_the_reference_choice(tmp_path, files):
    cfg = iterate.load_iterate_config(write(tmp_path, files))
    sft = files["model"]["path"]
    expected = ["train.max_steps=2", "model.path=/r1", f"reference.path={sft}", "data.train=p.jsonl",
                "output.dir=o", "output.resume=auto"]  # fmt: skip
    assert iterate.train_overrides(cfg, "/r1", "p.jsonl", "o") == expected
    files["iterate"] = {"reference": "previous"}
    cfg = iterate.load_iterate_config(write(tmp_path, files))
    assert iterate.train_overrides(cfg, "/r1", "p.jsonl", "o")[2] == "reference.path=/r1"


def test_generation_gets_the_training_configs_chat_template_kwargs(tmp_path, files):
    cfg = iterate.load_iterate_config(write(tmp_path, files))
    assert iterate.template_flags(cfg) == []
    files["train"]["overrides"]["data.chat_template_kwargs"] = "{enable_thinking: false}"
    cfg = iterate.load_iterate_config(write(tmp_path, files))
    assert iterate.template_flags(cfg) == ["--chat-template-kwargs", '{"enable_thinking": false}']


def test_a_run_folder_refuses_another_config_but_not_more_rounds(tmp_path, files):
    import dataclasses

    cfg = iterate.load_iterate_config(write(tmp_path, files))
    out = Path(cfg.output.dir)
    raw = iterate.flatten(dataclasses.asdict(cfg))
    iterate.check_same_run(cfg, out, raw)
    iterate.check_same_run(cfg, out, {**raw, "iterate.rounds": 5, "prep.procs": 4})  # operational: fine
    with pytest.raises(ConfigError, match=r"another config \(prep.n: 8 → 16\)"):
        iterate.check_same_run(cfg, out, {**raw, "prep.n": 16})
    assert iterate.unflatten(raw)["prep"]["n"] == 8 and iterate.unflatten(raw)["train"]["overrides"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "iterate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_iterate_configs_build(path):
    cfg = build(iterate.IterateConfig, read_tree(str(path)), "")
    assert cfg.train.config and (ROOT / cfg.train.config).is_file()


def test_one_driver_per_run_folder(tmp_path):
    held = iterate.hold_run_lock(tmp_path / "run")
    with pytest.raises(iterate.StageError, match="in use by another data_prep.iterate run"):
        iterate.hold_run_lock(tmp_path / "run")
    held.close()  # what the end of the first process does
    iterate.hold_run_lock(tmp_path / "run").close()


def test_report_over_seeds_hand_computed(tmp_path):
    """Two runs, greedy rewards 0.8 and 0.9 in round 1: mean 0.850, sd sqrt(0.005) = 0.071."""
    from data_prep.iterate_report import write_report

    for seed, reward in ((0, 0.8), (1, 0.9)):
        for r in (0, 1):
            folder = tmp_path / f"seed-{seed}" / "iterate" / f"round-{r}"
            folder.mkdir(parents=True)
            ev = {"greedy": {"mean_reward": reward if r else 0.5, "ci95": [0.4, 0.95], "solve_rate": 0.5,
                             "prompts": 10, "mean_tokens": 6.0}}  # fmt: skip
            (folder / "summary.json").write_text(json.dumps({"round": r, "policy_fingerprint": f"fp{seed}{r}",
                                                             "eval": ev, **({"pairs": 10 + seed} if r else {})}))  # fmt: skip
    report = write_report([tmp_path / "seed-0" / "iterate", tmp_path / "seed-1" / "iterate"], tmp_path)
    text = report.read_text()
    assert "| 1 | 0.850 ± 0.071 | – | 10.5 ± 0.7 | 6.00 ± 0.00 |" in text
    assert (
        "| 0 | 0.500 ± 0.000 |" in text
        and "## seed-1" in text
        and "| 1 | `fp11` | 0.900 [0.400, 0.950] |" in text
    )
    assert (tmp_path / "reward_by_round.png").read_bytes()[:4] == b"\x89PNG"
