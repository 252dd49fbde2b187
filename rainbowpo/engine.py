"""DeepSpeed, in one place: distributed init, ds-config assembly, policy + reference engines, checkpoints, export.

This is the only module of the project that imports deepspeed (a test reads the sources to keep it so).

    dist = init_distributed()
    policy = PolicyEngine.build(cfg, dist, total_steps, attn_implementation="packed_sdpa")
    logp, _ = policy.forward(batch); policy.backward(loss); policy.step()
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from rainbowpo import lora, lora_fused
from rainbowpo.config import Config, ConfigError, TrainSection
from rainbowpo.logprobs import SequenceScorer, router_aux_coef

DS_PRESETS = Path(__file__).resolve().parent.parent / "ds_configs"
MANAGED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankLostError(RuntimeError):
    """A peer rank died or stopped responding; the message names it."""


_MONITOR: dict = {}  # the gloo side group for monitored barriers and its timeout


def init_distributed(timeout_minutes: float = 60.0) -> DistInfo:
    """Join the process group (gloo on CPU, nccl on GPU); a lone `python -m` run becomes a world of 1.

    `timeout_minutes` (train.dist_timeout_minutes) bounds every collective, so a dead rank stops the others
    instead of leaving them waiting; a gloo side group serves `barrier()`, which names a missing rank."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    timeout = timedelta(minutes=timeout_minutes)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        _unlink_shm_allreduce_buffer()
    if torch.distributed.get_world_size() > 1:
        group = None if backend == "gloo" else torch.distributed.new_group(backend="gloo", timeout=timeout)
        _MONITOR.update(group=group, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def _unlink_shm_allreduce_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed's shm comm op (csrc/cpu/comm/shm.cpp) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (66 MB) in init and never unlinks it: every CPU run leaked 66 MB per rank until /dev/shm filled and vLLM's
    workers failed to start. The ranks map each other's buffers inside init, so after a barrier the names are no
    longer needed; the mappings stay valid and the memory is freed when the last rank exits, SIGKILL included."""
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{torch.distributed.get_rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave the process group together: a rank that exits with live gloo/NCCL threads can abort in C++
    ("terminate called without an active exception") and fail a finished run."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """All ranks meet here; a rank that does not arrive within train.dist_timeout_minutes is named
    (RankLostError on every rank that notices)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    try:
        torch.distributed.monitored_barrier(
            group=_MONITOR.get("group"), timeout=_MONITOR.get("timeout"), wait_all_ranks=True
        )
    except RuntimeError as exc:
        raise RankLostError(lost_ranks_message(str(exc))) from None


def is_comm_failure(exc: BaseException) -> bool:
    """A collective failed because a peer went away (gloo/NCCL connection errors and timeouts)."""
    text = str(exc)
    return isinstance(exc, RankLostError) or bool(
        re.search(
            r"(?i)gloo|nccl|connection (closed|reset|refused)|broken pipe|timed out|monitoredBarrier", text
        )
    )


def diagnose_lost_ranks(exc: BaseException) -> RankLostError:
    """After a failed collective: every survivor checks in at the rendezvous store (hosted by rank 0) and
    waits up to min(timeout / 2, 60 s) for the others; the ranks that never check in are named."""
    if isinstance(exc, RankLostError):
        return exc
    me, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    window = min(_MONITOR.get("timeout", timedelta(minutes=2)).total_seconds() / 2, 60.0)
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set(f"rainbowpo/alive/{me}", "1")
        deadline = time.monotonic() + window
        while True:
            missing = [r for r in range(world) if not store.check([f"rainbowpo/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except Exception:  # the store lives in rank 0's process: unreachable means rank 0 is gone
        missing = None
    return RankLostError(lost_ranks_message(str(exc), missing))


def lost_ranks_message(text: str, missing: list[int] | None = None) -> str:
    """One line naming the lost rank(s): from `missing`, or a monitored barrier's error text."""
    me = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    found = re.search(r"[Rr]anks? ([\d, ]+) failed to pass monitoredBarrier", text)
    if missing is None and found:
        missing = sorted({int(r) for r in re.findall(r"\d+", found.group(1))})
    if missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
    elif missing is None and me != 0:
        who = "rank 0 (it hosts the rendezvous store) or the link to it"
    else:
        who = "no rank is missing, yet a collective"
    first = text.strip().splitlines()[0][:160] if text.strip() else "no detail"
    return (
        f"{who} stopped responding (died or hung), seen by rank {me} [{first}]; this rank stops. "
        "Restart the job; output.resume: auto continues from the last complete checkpoint"
    )


# ----------------------------------------------------------------------------- ds config


def load_ds_preset(name_or_path: str) -> dict:
    """A ds_configs/ preset by name (zero3, zero3_offload, …) or a JSON path; `_comment` keys dropped."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_PRESETS / f"{name_or_path}.json"
    if not path.is_file():
        presets = sorted(p.stem for p in DS_PRESETS.glob("*.json"))
        raise ConfigError(f"deepspeed.config: {name_or_path!r} is neither a preset {presets} nor a JSON file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"deepspeed.config: {path} must be a JSON object of DeepSpeed keys, got {type(raw).__name__}"
        )
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def assemble_ds_config(
    preset: dict, train: TrainSection, dtype: str, world_size: int, grad_accum: int
) -> dict:
    """Preset ZeRO knobs + the numbers the training config owns; `auto` or a disagreeing value is an error."""
    micro = train.micro_batch_pairs
    owned = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    _reject_auto(preset)
    for key in MANAGED_KEYS:
        if key in preset and key in owned and preset[key] != owned[key]:
            raise ConfigError(
                f"deepspeed.config sets {key}={preset[key]!r} but the training config gives {owned[key]!r}; "
                "remove it from the DeepSpeed JSON (batch sizes, precision and clipping come from train.*/model.*)"
            )
        if key in ("optimizer", "scheduler") and key in preset:
            raise ConfigError(
                f"deepspeed.config: remove {key!r}; the optimizer and schedule come from train.*"
            )
    zero = preset.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(
            f'deepspeed.config: zero_optimization must be an object like {{"stage": 3}}, got {zero!r}'
        )
    zero = dict(zero)
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    config = {
        **preset,
        **owned,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if "offload_optimizer" in zero:
        config["zero_force_ds_cpu_optimizer"] = False  # a torch AdamW on CPU: correct, if slower than CPUAdam
    return config


def _reject_auto(node, path: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_auto(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _reject_auto(v, f"{path}[{i}]")
    elif node == "auto":
        raise ConfigError(
            f"deepspeed.config: {path} is 'auto'; write a number (the trainer fills batch/precision)"
        )


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# ----------------------------------------------------------------------------- models


def load_causal_lm(path: str, cfg: Config, ds_config: dict, attn_implementation: str):
    """from_pretrained under ZeRO-3 partitioned init when the ds-config says stage 3 (HfDeepSpeedConfig)."""
    hf_ds = HfDeepSpeedConfig(ds_config)  # must stay alive while the model is built and trained
    looks_local = "/" not in path or os.path.isabs(path) or path.startswith(".")
    if not os.path.exists(path) and looks_local:
        raise ConfigError(f"model path not found: {path!r} (a local Hugging Face folder or a hub name)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=TORCH_DTYPES[cfg.model.dtype],
            attn_implementation=attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            **({"quantization_config": lora.quantization_config(cfg)} if cfg.model.load_in_4bit else {}),
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model from {path!r}: {str(exc).splitlines()[0]}") from None
    model.config.use_cache = False
    if zero_stage(ds_config) == 3:
        mark_moe_leaves(model)
    return model, hf_ds


def moe_block_classes(model) -> list[type]:
    """Sparse mixture-of-experts blocks (Mixtral/Qwen2-MoE/… `*SparseMoeBlock`, `*MoeBlock`, `*MoE`)."""
    names = ("SparseMoeBlock", "MoeBlock", "SparseMoE", "MoE")
    return sorted({type(m) for m in model.modules() if type(m).__name__.endswith(names)}, key=str)


def mark_moe_leaves(model) -> list[type]:
    """ZeRO-3: gather a MoE block's experts together when the block is entered (not per expert): a rank
    whose tokens skip an expert would otherwise wait for a gather the other ranks never request."""
    classes = moe_block_classes(model)
    if classes:
        deepspeed.utils.set_z3_leaf_modules(model, classes)
    return classes


def _adamw(params, t: TrainSection) -> torch.optim.AdamW:
    """torch's fused AdamW (CPU and CUDA; 4–6× faster than the per-tensor loop on CPU), else the default."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)


def _lr_lambda(train: TrainSection, total_steps: int):
    warmup = int(math.ceil(train.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if train.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if train.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class PolicyEngine:
    """The trained model: a DeepSpeed engine around SequenceScorer(policy)."""

    def __init__(self, engine, hf_ds, ds_config: dict, adapter_only: bool = False):
        self.engine, self._hf_ds, self.ds_config = engine, hf_ds, ds_config
        self._plain_norm: float | None = None
        self.adapter_only = adapter_only  # LoRA: checkpoints hold the adapter and its optimizer state only

    @classmethod
    def build(
        cls,
        cfg: Config,
        dist: DistInfo,
        grad_accum: int,
        total_steps: int,
        attn_implementation: str,
        load_universal: bool = False,
    ):
        """`load_universal`: the resume checkpoint is a converted universal one (another world size)."""
        ds_config = assemble_ds_config(
            load_ds_preset(cfg.deepspeed.config), cfg.train, cfg.model.dtype, dist.world_size, grad_accum
        )
        if load_universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        if cfg.train.on_nan == "skip_step" and zero_stage(ds_config) == 0:
            raise ConfigError(
                "train.on_nan: skip_step needs ZeRO stage >= 1 (DeepSpeed discards the bad step)"
            )
        model, hf_ds = load_causal_lm(cfg.model.path, cfg, ds_config, attn_implementation)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        aux_coef = router_aux_coef(model, cfg.train.router_aux_loss_coef)  # MoE only
        if cfg.model.uses_lora():
            model = lora.wrap(model, cfg)
            if cfg.model.lora.fused:
                lora_fused.fuse(model)
        scorer = SequenceScorer(model, cfg.train.logprob_chunk, cfg.train.keep_logits_mb, aux_coef)
        t = cfg.train
        optimizer = _adamw((p for p in scorer.parameters() if p.requires_grad), t)  # LoRA: the adapter only

        def schedule(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t, total_steps))

        engine, _, _, _ = deepspeed.initialize(
            model=scorer,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=ds_config,
            dist_init_required=False,
        )
        return cls(engine, hf_ds, ds_config, adapter_only=cfg.model.uses_lora())

    @property
    def scorer(self) -> SequenceScorer:
        return self.engine.module

    def forward(self, batch, with_entropy: bool = False):
        self.engine.train()
        return self.engine(batch, with_entropy=with_entropy)

    @torch.no_grad()
    def evaluate(self, batch, with_entropy: bool = False):
        self.engine.eval()
        out = self.engine(batch, with_entropy=with_entropy)
        self.engine.train()
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already scaled by this micro-batch's share of the step (SPEC §1.9): no GAS rescale.

        DeepSpeed counts micro-steps: `engine.step()` follows every backward and only the one at the
        accumulation boundary updates the weights.
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss, scale_wrt_gas=False)
        if not boundary:
            self.engine.step()

    def step(self) -> None:
        """The boundary micro-step: reduce, clip, update (ZeRO skips it if the gradient is non-finite)."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "optimizer step requested off the accumulation boundary (micro-batch count mismatch)"
            )
        self._plain_norm = None
        if zero_stage(self.ds_config) == 0:  # DeepSpeed keeps no norm without ZeRO; grads are reduced by now
            grads = [
                p.grad.detach().float().pow(2).sum()
                for p in self.engine.module.parameters()
                if p.grad is not None
            ]
            self._plain_norm = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
            if not math.isfinite(self._plain_norm):
                return  # no ZeRO to discard it: leave the weights untouched (the loop stops; skip_step needs ZeRO)
        self.engine.step()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def grad_norm(self) -> float:
        norm = self._plain_norm if self._plain_norm is not None else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def partitioned_numel(self) -> int:
        return partitioned_numel(self.engine.module)

    def param_checksum(self) -> list[float]:
        """[Σw, Σw²] over all weights in float64: equal on every rank and for every world size (ZeRO-3 sums
        each rank's partition, padding excluded, then all-reduces). A collective under ZeRO-3."""
        sharded = zero_stage(self.ds_config) == 3
        rank = torch.distributed.get_rank() if sharded else 0
        total = None
        for p in self.engine.module.parameters():
            if sharded:
                part = p.ds_tensor.detach().reshape(-1)
                start = rank * part.numel()
                t = part[: max(0, min(part.numel(), p.ds_numel - start))]
            else:
                t = p.detach().reshape(-1)
            if total is None:
                total = torch.zeros(2, dtype=torch.float64, device=t.device)
            for chunk in t.split(1 << 24):  # float64 copies of at most 128 MB, on the parameter's device
                c = chunk.double()
                total += torch.stack([c.sum(), c.square().sum()])
        total = total if total is not None else torch.zeros(2, dtype=torch.float64)
        if sharded:
            total = all_reduce_sum(total.to(self.engine.device))  # NCCL needs it on the GPU
        return total.cpu().tolist()

    # --------------------------------------------------------------- checkpoints and export

    def save(self, root: str, tag: str) -> None:
        """All ranks: DeepSpeed shards into root/tag (no `latest` file: completion is marked by the caller)."""
        self.engine.save_checkpoint(
            root, tag=tag, client_state={}, save_latest=False, exclude_frozen_parameters=self.adapter_only
        )

    def load(self, root: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(root, tag=tag, load_module_strict=not self.adapter_only)
        if path is None:
            raise RuntimeError(
                f"checkpoint {os.path.join(root, tag)} could not be loaded (corrupt or incomplete)"
            )

    def full_state_dict(self) -> dict | None:
        """The HF model's full weights on rank 0 (ZeRO-3: gathered 16-bit/fp32 shards); None elsewhere."""
        if zero_stage(self.ds_config) == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if torch.distributed.get_rank() == 0 else None
        if state is None:
            return None
        prefix = "model."
        return {k[len(prefix) :] if k.startswith(prefix) else k: v.detach().cpu() for k, v in state.items()}


def partitioned_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds (ZeRO-3 partitions `ds_tensor`; otherwise the full tensors)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


class ReferenceEngine:
    """Frozen reference: a DeepSpeed inference engine (ZeRO-3, optional CPU param offload), no optimizer."""

    def __init__(self, engine, hf_ds):
        self.engine, self._hf_ds = engine, hf_ds
        self.engine.eval()

    @classmethod
    def build(cls, cfg: Config, dist: DistInfo, grad_accum: int, attn_implementation: str):
        preset = load_ds_preset(cls.preset_name(cfg))
        ds_config = assemble_ds_config(preset, cfg.train, cfg.model.dtype, dist.world_size, grad_accum)
        ds_config.pop("zero_force_ds_cpu_optimizer", None)
        model, hf_ds = load_causal_lm(cfg.reference_path(), cfg, ds_config, attn_implementation)
        model.requires_grad_(False)
        scorer = SequenceScorer(model, cfg.train.logprob_chunk, cfg.train.keep_logits_mb)
        engine, _, _, _ = deepspeed.initialize(model=scorer, config=ds_config, dist_init_required=False)
        return cls(engine, hf_ds)

    @staticmethod
    def preset_name(cfg: Config) -> str:
        """Offloaded ZeRO-3 when asked; sharded like the policy under ZeRO-3; else replicated (no optimizer
        state to shard, and ZeRO-3 gathers would only cost time)."""
        if cfg.reference.offload:
            return "ref_zero3_offload"
        return "zero3" if zero_stage(load_ds_preset(cfg.deepspeed.config)) == 3 else "zero0"

    @torch.no_grad()
    def forward(self, batch, with_entropy: bool):
        return self.engine(batch, with_entropy=with_entropy)

    def partitioned_numel(self) -> int:
        return partitioned_numel(self.engine.module)

    def release(self) -> None:
        """Free the reference weights (cached mode, after the pass)."""
        self.engine.destroy()
        self.engine = None
