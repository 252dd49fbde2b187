"""The one config of `data_prep.iterate`: prep settings, the training config + overrides, the held-out
evaluation and the rounds, validated up front with rainbowpo.config's machinery and error style (one line
naming the key and the file, a "did you mean" for a misspelled key).

    cfg = load_iterate_config("configs/iterate/demo.yaml", ["iterate.rounds=3", "prep.n=16"])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep import select as select_stage
from rainbowpo.config import ConfigError, build, load_config, read_tree


@dataclass(frozen=True)
class ModelSection:
    path: str = ""
    """The initial policy (the SFT model): round 1 samples from it; the `initial` reference."""

    def __post_init__(self) -> None:
        _need(self.path, "model.path", "the SFT model folder")


@dataclass(frozen=True)
class IterateSection:
    rounds: int = 2
    """Rounds to run (`--rounds` overrides); raising it later continues a finished run."""
    reference: Literal["initial", "previous"] = "initial"
    """Reference of round r: initial = the SFT model every round; previous = policy r−1 (the base)."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"iterate.rounds: must be >= 1, got {self.rounds}")


@dataclass(frozen=True)
class PrepSection:
    prompts: str = ""
    """Prompt jsonl ({"id", "prompt"} or {"id", "messages"}) to sample from each round."""
    prompts_per_round: int = 0
    """0: every round samples all prompts; m > 0: round r takes the r-th slice of m prompts (wrapping)."""
    n: int = 8
    """Candidates per prompt."""
    temperature: float = 1.0
    """Sampling temperature of the candidates."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_new_tokens: int = 64
    """Longest candidate, in tokens."""
    seed: int = 0
    """Round r samples and selects with seed + r (a new draw every round, the same on a re-run)."""
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine (data_prep.generate --engine)."""
    procs: int = 1
    """Generation processes (`--shard i/procs` each)."""
    chunk: int = 16
    """Prompts per atomically written part file (what a killed generation keeps)."""
    reward: str = ""
    """A reward function module:function (or reward_model)."""
    reward_model: str = ""
    """A sequence-classification reward model folder (or reward)."""
    method: Literal[select_stage.METHODS] = "rso"
    """Pair selection (data_prep.select --method)."""
    pairing: Literal[select_stage.PAIRINGS] = "first_round"
    """How rso / gumbel_topk pair their accepted candidates."""
    k: int = 4
    """rso, gumbel_topk: candidates accepted per prompt."""
    beta_rso: float = 0.5
    """rso, gumbel_topk: reward temperature β_rso."""
    min_gap: float = 0.0
    """Minimum reward difference of a pair."""

    def __post_init__(self) -> None:
        _need(self.prompts, "prep.prompts", "a prompt jsonl file")
        if bool(self.reward) == bool(self.reward_model):
            raise ConfigError("prep: give exactly one of prep.reward (module:function) or prep.reward_model")
        for key in ("n", "procs", "chunk", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"prep.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class TrainLaunch:
    config: str = ""
    """The training YAML (rainbowpo.train), e.g. configs/demo/rainbowpo.yaml."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Dotted overrides of that config, {train.epochs: 2}; model.path, reference.path, data.train,
    output.dir and output.resume are set by the driver each round."""
    num_accelerators: int = 1
    """Ranks on this machine (deepspeed --num_accelerators); 0 = deepspeed's default (all GPUs)."""
    hostfile: str = ""
    """A deepspeed hostfile for multi-node training (`--hostfile` overrides)."""
    launcher_args: list[str] = field(default_factory=list)
    """Extra arguments for the deepspeed launcher, e.g. [--no_ssh, --node_rank, "0"]."""

    def __post_init__(self) -> None:
        _need(self.config, "train.config", "the training YAML, e.g. configs/demo/rainbowpo.yaml")
        taken = sorted(set(self.overrides) & set(DRIVER_KEYS))
        if taken:
            raise ConfigError(f"train.overrides: {taken} are set by the driver each round; remove them")


DRIVER_KEYS = ("model.path", "reference.path", "data.train", "output.dir", "output.resume")


@dataclass(frozen=True)
class EvalSection:
    prompts: str = ""
    """Held-out prompt jsonl (no overlap with prep.prompts)."""
    reward: str = ""
    """Reward function module:function for the held-out answers (default: prep's reward or reward model)."""
    max_new_tokens: int = 64
    """Longest answer, in tokens."""
    seed: int = 0
    """Sampling seed of the evaluation (the same every round: each round answers with the same draws)."""
    samples: int = 4
    """Sampled answers per prompt at `temperature` (besides the greedy one); 0 = greedy only."""
    temperature: float = 1.0
    """Temperature of the sampled answers."""

    def __post_init__(self) -> None:
        _need(self.prompts, "eval.prompts", "a held-out prompt jsonl file")


@dataclass(frozen=True)
class OutputSection:
    dir: str = "runs/iterate"
    """Run folder: iterate.yaml, round-0 … round-R, report.md, reward_by_round.png."""


@dataclass(frozen=True)
class IterateConfig:
    model: ModelSection
    prep: PrepSection
    train: TrainLaunch
    eval: EvalSection
    iterate: IterateSection = field(default_factory=IterateSection)
    output: OutputSection = field(default_factory=OutputSection)


def _need(value: str, key: str, what: str) -> None:
    if not value:
        raise ConfigError(f"{key}: is required ({what})")


OPERATIONAL = ("iterate.rounds", "prep.procs", "prep.chunk", "train.num_accelerators", "train.hostfile",
               "train.launcher_args")  # fmt: skip  # may change between invocations of one run


def load_iterate_config(path: str, overrides: list[str] = ()) -> IterateConfig:
    """Read, build and check everything a round will need — files, reward function, the training config —
    so that a mistake fails now and names the file, not after an hour of sampling."""
    try:
        cfg = build(IterateConfig, read_tree(path, overrides), "")
        check_inputs(cfg)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(path) else f"{path}: {text}") from None
    return cfg


def check_inputs(cfg: IterateConfig) -> None:
    from data_prep.common import load_function

    for key, value, kind in (("model.path", cfg.model.path, os.path.isdir),
                             ("prep.prompts", cfg.prep.prompts, os.path.isfile),
                             ("eval.prompts", cfg.eval.prompts, os.path.isfile),
                             ("train.config", cfg.train.config, os.path.isfile)):  # fmt: skip
        if not kind(value):
            raise ConfigError(f"{key}: {value} not found")
    if cfg.train.hostfile and not os.path.isfile(cfg.train.hostfile):
        raise ConfigError(f"train.hostfile: {cfg.train.hostfile} not found")
    for key, spec in (("prep.reward", cfg.prep.reward), ("eval.reward", cfg.eval.reward)):
        if spec:
            try:
                load_function(spec)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    if cfg.prep.method in select_stage.SAMPLERS and (cfg.prep.k < 2 or cfg.prep.beta_rso <= 0):
        raise ConfigError(f"prep: {cfg.prep.method} needs k >= 2 and beta_rso > 0")
    try:  # the training config as round 1 will run it
        load_config(cfg.train.config, train_overrides(cfg, cfg.model.path, "pairs.jsonl", "out"))
    except ConfigError as exc:
        raise ConfigError(f"train.config {cfg.train.config} (with train.overrides): {exc}") from None


def chat_template_kwargs(cfg: IterateConfig) -> dict:
    """data.chat_template_kwargs of the training config (with train.overrides): generation, scoring and
    evaluation render prompts with them, as training does."""
    train = load_config(cfg.train.config, train_overrides(cfg, cfg.model.path, "pairs.jsonl", "out"))
    return dict(train.data.chat_template_kwargs)


def train_overrides(cfg: IterateConfig, base: str, pairs: str, out: str) -> list[str]:
    reference = cfg.model.path if cfg.iterate.reference == "initial" else base
    fixed = {"model.path": base, "reference.path": reference, "data.train": pairs, "output.dir": out,
             "output.resume": "auto"}  # fmt: skip
    return [f"{k}={v}" for k, v in {**cfg.train.overrides, **fixed}.items()]


def check_same_run(cfg: IterateConfig, out: Path, raw: dict) -> None:
    """output.dir/iterate.yaml holds the config of the run; a different one (beyond OPERATIONAL keys) is
    refused, so one folder never mixes data of two settings."""
    import yaml

    path = out / "iterate.yaml"
    if path.exists():
        old = flatten(yaml.safe_load(path.read_text()))
        changed = sorted(k for k in set(old) | set(raw) if old.get(k) != raw.get(k) and k not in OPERATIONAL)
        if changed:
            k = changed[0]
            raise ConfigError(f"{out} holds a run made with another config ({k}: {old.get(k)!r} → {raw.get(k)!r}"
                              f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                              "restore it or use a new output.dir")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(unflatten(raw), sort_keys=False))


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "overrides":
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *parents, last = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree
