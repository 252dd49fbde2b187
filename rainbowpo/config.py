"""The one typed config tree: YAML file + dotted overrides, validated before anything heavy starts.

    cfg = load_config("configs/rainbowpo.yaml", ["objective.beta=5", "train.lr=1e-6"])

Frozen dataclasses grouped by concern; every field has its default and docstring here and nowhere
else; validation lives in `__post_init__`; derived numbers are methods. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config mistake: the message names the key and says what to do."""


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


@dataclass(frozen=True)
class LoraSection:
    """LoRA (Hu et al. 2021, arXiv:2106.09685): W + (alpha / r)·B·A on the target layers, base frozen."""

    r: int = 0
    """Adapter rank; 0 = LoRA off (full fine-tuning). Implied by model.adapter_path (its rank is used)."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapter's input (0 keeps no extra activation copy; the reference pass never drops)."""
    target_modules: list[str] = field(default_factory=list)
    """Layer names to adapt, e.g. [q_proj, v_proj]; empty = every linear layer of attention and MLP (found by
    scanning the model, the LM head excluded)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapter (e.g. [lm_head] after adding tokens)."""
    fused: bool = True
    """One-buffer LoRA linear (rainbowpo.lora_fused) instead of peft's forward where it applies (dropout 0,
    no DoRA, not ZeRO-3 partitioned); checked against peft's at start-up. false: peft's forward always."""

    def __post_init__(self) -> None:
        _require(self.r >= 0, "model.lora.r", "must be >= 0 (0 = LoRA off)", self.r)
        _require(self.alpha > 0, "model.lora.alpha", "must be > 0", self.alpha)
        _require(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Hugging Face model folder (or hub name) of the policy."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (written into the DeepSpeed config)."""
    attn_implementation: Literal[
        "auto", "flash_attention_2", "sdpa", "eager", "packed_sdpa", "packed_mask"
    ] = "auto"
    """auto: flash-attention 2 when CUDA and flash_attn are present, per-segment sdpa otherwise."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward (less activation memory, ~30 % slower)."""
    trust_remote_code: bool = False
    """Run model code shipped inside the model folder. Off unless you trust the folder."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapter settings (docs/recipes.md, "LoRA and QLoRA"); off while model.lora.r is 0."""
    adapter_path: str = ""
    """Start from a trained LoRA adapter folder (PeftModel format); the reference is then that adapter."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit NF4 with bitsandbytes (needs CUDA and LoRA; ZeRO stage 0 or 2)."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path", "is required (a Hugging Face model folder)", self.path)
        if self.load_in_4bit and not self.uses_lora():
            raise ConfigError(
                "model.load_in_4bit: true trains an adapter on a frozen 4-bit base; "
                "set model.lora.r (e.g. 16) or model.adapter_path"
            )

    def uses_lora(self) -> bool:
        """Train a LoRA adapter (model.lora.r > 0 or model.adapter_path) instead of every weight."""
        return self.lora.r > 0 or bool(self.adapter_path)


@dataclass(frozen=True)
class SourceConfig:
    path: str = ""
    """Local jsonl/json/parquet/csv file, a `datasets.save_to_disk` folder, or a hub dataset name."""
    split: str = "train"
    """Split to read (hub datasets and save_to_disk DatasetDicts)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping {our_name: their_name}, e.g. {prompt: question, chosen: good}."""
    weight: float = 1.0
    """Mixing weight: rows drawn ∝ weight (1.0 = take the source once)."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "data source path", "is required", self.path)
        _require(self.weight > 0, f"data source {self.path}: weight", "must be > 0", self.weight)


@dataclass(frozen=True)
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    """Training sources (at least one)."""
    eval: list[SourceConfig] = field(default_factory=list)
    """Evaluation sources (optional)."""
    format: Literal["auto", "standard", "conversational", "implicit", "sft"] = "auto"
    """Row format; auto-detected from the columns unless forced."""
    max_length: int = 1024
    """Max tokens of prompt + response (per sequence)."""
    max_prompt_length: int | None = None
    """Max prompt tokens; longer prompts are cut from their start (the end is kept). Unset: half of
    data.max_length (`prompt_limit()`; the start-up summary says what it resolved to)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra options for the chat template wherever it renders (training data, generation), e.g.
    {enable_thinking: false}."""
    truncation_keep_eos: bool = False
    """When a response is cut, end it with EOS anyway (default: the cut response has no EOS)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """Bad rows raise a ValueError naming source and row, or are skipped and counted."""
    packing: bool = True
    """Pack sequences into one row (attention kept inside each sequence) instead of padding."""
    share_prompt: bool | None = None
    """Pack [prompt, chosen, rejected] computing the prompt once per pair (exact; needs packing). Unset: on
    for preference pairs whenever attention runs per segment (measured faster, docs/benchmarks.md); off
    for SFT, padded batches and the flash-attention varlen kernel."""
    num_proc: int = 0
    """Processes that tokenize (on local rank 0 of each node); 0: all CPUs (≤ 16) from 10,000 rows, else 1."""
    cache_dir: str = ""
    """Where tokenized data is cached, keyed by sources + tokenizer + these settings (default:
    $RAINBOWPO_CACHE/data, else ~/.cache/rainbowpo/data). A second run with the same key reads it."""

    def __post_init__(self) -> None:
        _require(len(self.train) > 0, "data.train", "needs at least one source", self.train)
        _require(self.num_proc >= 0, "data.num_proc", "must be ≥ 0 (0 = automatic)", self.num_proc)
        _require(self.max_length > 1, "data.max_length", "must be > 1", self.max_length)
        _require(
            self.max_prompt_length is None or 0 < self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            "must be in (0, data.max_length)",
            self.max_prompt_length,
        )
        _require(not self.share_prompt or self.packing, "data.share_prompt", "needs data.packing: true", True)

    def prompt_limit(self) -> int:
        """data.max_prompt_length, or half of data.max_length when unset (always leaves a response token)."""
        return self.max_prompt_length if self.max_prompt_length is not None else max(1, self.max_length // 2)


@dataclass(frozen=True)
class ObjectiveSection:
    """`preset` plus any field of rainbowpo.objective.ObjectiveConfig (None = the preset's value)."""

    preset: str = "dpo"
    """dpo | ipo | hinge | simpo | mallows_dpo | rainbowpo: a row of rainbowpo.objective.PRESETS."""
    beta: float | None = None
    link: str | None = None
    length_norm: bool | None = None
    mix_alpha: float | None = None
    mix_gamma: float | None = None
    margin: float | None = None
    contextual_scaling: bool | None = None
    dispersion: float | None = None
    sft_weight: float | None = None
    label_smoothing: float | None = None

    def build(self):
        """The validated `ObjectiveConfig` (imports torch)."""
        from rainbowpo.objective import ObjectiveConfig

        overrides = {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}
        try:
            return ObjectiveConfig.from_preset(self.preset, **overrides)
        except ValueError as exc:  # the objective's own range checks, reported as config errors
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class ReferenceConfig:
    mode: Literal["auto", "online", "cached", "none"] = "auto"
    """online: a second DeepSpeed engine; cached: precomputed once; none: reference-free; auto: derived."""
    path: str = ""
    """Reference model folder (default: model.path)."""
    offload: bool = False
    """Online mode: ZeRO-3 inference engine with parameters offloaded to CPU."""
    cache_dir: str = ""
    """Cached mode: where reference log-probs live (default: <output.dir>/../ref_cache)."""


@dataclass(frozen=True)
class TrainSection:
    mode: Literal["preference", "sft"] = "preference"
    """preference: the RainbowPO objective; sft: NLL on completions (no reference)."""
    global_batch_pairs: int = 64
    """Pairs (SFT: examples) per optimizer step, over all ranks and accumulation steps."""
    micro_batch_pairs: int = 1
    """Pairs per forward on one rank; accumulation = global / (world × micro)."""
    micro_batch_tokens: int = 0
    """If > 0: balance micro-batches by tokens, none over this budget: accumulation starts at ⌈heaviest
    step's tokens / (world × this)⌉ and grows until every step of every epoch fits. Error if one pair is
    longer than the budget."""
    lr: float = 5e-7
    """Peak learning rate (AdamW)."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up: linear or cosine to 0, or constant."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with a linear warm-up from 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2)."""
    epochs: int = 1
    """Passes over the training set."""
    max_steps: int = 0
    """If > 0: stop after this many optimizer steps (overrides epochs)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    seed: int = 42
    """Seeds the data order, dropout and sampling; the same seed gives the same run."""
    shuffle: bool = True
    """Reshuffle the rows every epoch (seeded); false keeps the file order (curricula, benchmarks)."""
    on_nan: Literal["stop", "skip_step"] = "stop"
    """A non-finite loss or gradient: stop (naming step, rows, last good checkpoint) or skip the step."""
    eval_every: int = 0
    """Evaluate on data.eval every N steps (0 = only at the end)."""
    logprob_chunk: int = 1024
    """Response positions per LM-head chunk when the head is recomputed (see keep_logits_mb)."""
    keep_logits_mb: float = 512
    """A micro-batch's LM-head logits (response positions × vocab × 4 bytes) up to this size are computed at
    once and one buffer of that size (their softmax) stays for backward; larger ones are computed in chunks
    of logprob_chunk and recomputed in backward."""
    retain_host_memory: bool = True
    """CPU training on glibc: keep freed memory in the process for reuse instead of handing it back to the
    OS, so large tensors are not page-faulted in anew every step (~10 % faster here; RSS does not shrink)."""
    dist_timeout_minutes: float = 60.0
    """Collective timeout: a rank that dies or hangs makes the others stop after this long, naming it. Must
    exceed the longest single-rank pause (rank 0 writing the final export, a checkpoint conversion)."""
    router_aux_loss_coef: float | None = None
    """Mixture-of-experts models: weight of the router load-balancing loss added to the objective
    (None: the model config's own `router_aux_loss_coef`; 0: off). Ignored for dense models."""

    def __post_init__(self) -> None:
        for key in ("global_batch_pairs", "micro_batch_pairs", "epochs", "logprob_chunk"):
            _require(getattr(self, key) >= 1, f"train.{key}", "must be >= 1", getattr(self, key))
        _require(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _require(self.keep_logits_mb >= 0, "train.keep_logits_mb", "must be >= 0", self.keep_logits_mb)
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0", self.max_grad_norm)
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0", self.max_steps)
        _require(
            self.dist_timeout_minutes > 0,
            "train.dist_timeout_minutes",
            "must be > 0",
            self.dist_timeout_minutes,
        )
        _require(
            self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
            "train.router_aux_loss_coef",
            "must be >= 0 or null",
            self.router_aux_loss_coef,
        )
        _require(
            self.micro_batch_tokens >= 0, "train.micro_batch_tokens", "must be >= 0", self.micro_batch_tokens
        )

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps for pair-count micro-batches: global / (world × micro), must divide."""
        per_step = world_size * self.micro_batch_pairs
        if self.global_batch_pairs % per_step:
            raise ConfigError(
                f"train.global_batch_pairs={self.global_batch_pairs} is not divisible by world size {world_size} "
                f"× train.micro_batch_pairs={self.micro_batch_pairs}; pick a multiple of {per_step}"
            )
        return self.global_batch_pairs // per_step


@dataclass(frozen=True)
class DeepSpeedSection:
    config: str = "zero3"
    """A preset name from ds_configs/ (zero0, zero2, zero3, zero3_offload) or a path to a JSON file."""


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, final/ (shared filesystem for multi-node)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint; never; or a checkpoint path."""
    export: bool = True
    """Write a Hugging Face model folder to <dir>/final at the end."""
    export_every: int = 0
    """Also write a Hugging Face folder <dir>/exports/step-N every N optimizer steps (0 = none)."""
    checkpoints: bool = True
    """Write resumable checkpoints (false: none at all, e.g. for benchmarks; a killed run is then lost)."""

    def __post_init__(self) -> None:
        _require(self.keep_last >= 1, "output.keep_last", "must be >= 1", self.keep_last)
        _require(self.save_every >= 0, "output.save_every", "must be >= 0", self.save_every)
        _require(self.export_every >= 0, "output.export_every", "must be >= 0", self.export_every)


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 1
    """Write a metrics.jsonl record every N optimizer steps."""
    tensorboard: bool = False
    """Also write TensorBoard events to <output.dir>/tensorboard (needs tensorboard installed)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs wandb installed and logged in)."""
    wandb_project: str = "rainbowpo"
    """W&B project name."""
    progress: bool = True
    """tqdm progress bar on rank 0."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.train.mode == "preference":
            objective = self.objective.build()
            if self.reference.mode == "none" and objective.needs_reference:
                need = (
                    "objective.mix_alpha > 0" if objective.mix_alpha > 0 else "objective.contextual_scaling"
                )
                raise ConfigError(
                    f"reference.mode: none, but {need} needs a reference model; "
                    "set reference.mode to online or cached (or mix_alpha: 0 and contextual_scaling: false)"
                )
        if self.model.uses_lora() and self.reference.path:
            raise ConfigError(
                "reference.path: with LoRA the reference is the policy's own base (adapter off) or the starting "
                "adapter (model.adapter_path); remove reference.path"
            )
        if self.data.share_prompt and self.train.mode == "sft":
            raise ConfigError("data.share_prompt: only for preference pairs, not train.mode: sft")
        if self.data.format != "auto" and (self.data.format == "sft") != (self.train.mode == "sft"):
            raise ConfigError(
                f"data.format: {self.data.format} rows do not fit train.mode: {self.train.mode}; "
                "use data.format: auto or change train.mode"
            )

    def reference_mode(self) -> str:
        """online | cached | none, with `auto` resolved from what the objective needs."""
        if self.train.mode == "sft":
            return "none"
        if self.reference.mode == "auto":
            return "online" if self.objective.build().needs_reference else "none"
        return self.reference.mode

    def reference_path(self) -> str:
        return self.reference.path or self.model.path

    def reference_cache_dir(self) -> str:
        return self.reference.cache_dir or os.path.join(
            os.path.dirname(self.output.dir.rstrip("/")) or ".", "ref_cache"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


# ----------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read YAML (optional), apply `a.b=value` overrides (values parsed as YAML), build and validate."""
    raw: dict = read_tree(path) if path else {}
    for item in overrides:
        _apply_override(raw, item)
    return build(Config, raw, "")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. objective.beta=5")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); quote it or fix the brackets"
        ) from None


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping: unknown keys get a "did you mean", every value is type-checked."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError:  # a required section is missing
        missing = [n for n in names if n not in raw and _is_required(cls, n)]
        raise ConfigError(f"{where}: missing required key(s) {missing}") from None


def _is_required(cls: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is SourceConfig and isinstance(value, str):  # a source may be written as just its path
        value = {"path": value}
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}{hint}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]  # one source may be written without a list
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if args and args[1] is Any:  # free-form options (chat_template_kwargs) keep their YAML types
            return {str(k): v for k, v in value.items()}
        return {str(k): str(v) for k, v in value.items()}
    return _scalar(tp, value, key)


def _scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def read_tree(path: str, overrides: list[str] = ()) -> dict:
    """A YAML mapping (duplicate keys rejected) plus `a.b=value` overrides, not yet validated — for other
    typed trees (data_prep.iterate) that want this module's error style; pass the result to `build`."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_StrictLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return raw
