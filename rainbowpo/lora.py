"""LoRA and QLoRA: train a low-rank adapter on a frozen base; the reference is the base with the adapter off.

    model.lora.r=16                       # LoRA on every attention/MLP linear layer (Hu et al. 2021)
    model.adapter_path=runs/sft/final_adapter   # start from a trained adapter; it is also the reference
    model.load_in_4bit=true               # QLoRA (Dettmers et al. 2023): NF4 base, needs CUDA + bitsandbytes

One model is in memory. The online reference is the policy itself inside `reference_weights(model)`: the
adapter disabled (π_ref = base, exactly: LoRA adds B·A·x with B = 0 at start), or, when training starts from
a trained adapter, a frozen second copy of that adapter's weights only (TRL's `ref_adapter_name`). Only the
adapter parameters require grad, so only they get gradients, optimizer state and checkpoint space.

Export writes the merged model (W + (alpha/r)·B·A, computed here from the gathered weights, so ZeRO-3
needs no second model) to output.dir/final and the adapter alone to output.dir/final_adapter.
`resolve_model_folder(path)` lets generation/evaluation take either kind of folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import torch

from rainbowpo.config import Config, ConfigError
from rainbowpo.fingerprint import model_fingerprint

TRAINED = "default"  # peft's adapter name: the one being trained
REFERENCE = "reference"  # the frozen copy of model.adapter_path, when training starts from one
ADAPTER_CONFIG = "adapter_config.json"


# ----------------------------------------------------------------------------- config checks


def check_runtime(cfg: Config, zero_stage: int) -> None:
    """QLoRA's machine requirements, before any weight loads: CUDA, bitsandbytes, ZeRO stage < 3."""
    if not cfg.model.load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.load_in_4bit: true needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
            "Set model.load_in_4bit: false to train LoRA on the full-precision base"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "model.load_in_4bit: true needs bitsandbytes; pip install -r requirements-gpu.txt"
        ) from None
    if zero_stage == 3:
        raise ConfigError(
            "model.load_in_4bit: the 4-bit base cannot be partitioned by ZeRO-3 here; "
            "use deepspeed.config: zero2 or zero0 (the base is frozen, only the small adapter is sharded)"
        )


def quantization_config(cfg: Config):
    """BitsAndBytesConfig for a 4-bit NF4 base computing in model.dtype (QLoRA), or None."""
    if not cfg.model.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


# ----------------------------------------------------------------------------- wrapping


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every linear layer except the LM head: q/k/v/o and gate/up/down for Llama."""
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is head or not _is_linear(module):
            continue
        names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ConfigError(
            f"model.lora.target_modules: no linear layer found in {type(model).__name__}; list the layer names"
        )
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Conv1D")  # bitsandbytes 4-bit, GPT-2 style


def wrap(model: torch.nn.Module, cfg: Config):
    """The PeftModel to train: a fresh adapter (model.lora) or model.adapter_path twice (trained + frozen ref)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    m = cfg.model
    if m.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=m.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if m.adapter_path:
        if not os.path.isfile(os.path.join(m.adapter_path, ADAPTER_CONFIG)):
            raise ConfigError(
                f"model.adapter_path: {m.adapter_path} has no {ADAPTER_CONFIG}; give a folder written by "
                "PeftModel.save_pretrained (e.g. a run's output.dir/final_adapter)"
            )
        peft_model = PeftModel.from_pretrained(
            model, m.adapter_path, adapter_name=TRAINED, is_trainable=True, autocast_adapter_dtype=False
        )
        peft_model.load_adapter(
            m.adapter_path, adapter_name=REFERENCE, is_trainable=False, autocast_adapter_dtype=False
        )
        peft_model.set_adapter(TRAINED)
        return peft_model
    lcfg = LoraConfig(
        r=m.lora.r,
        lora_alpha=m.lora.alpha,
        lora_dropout=m.lora.dropout,
        target_modules=list(m.lora.target_modules) or default_target_modules(model),
        modules_to_save=list(m.lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg, autocast_adapter_dtype=False)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def reference_weights(peft_model):
    """Inside: the model computes π_ref — the frozen starting adapter if one was loaded, else the bare base."""
    if REFERENCE in peft_model.peft_config:
        peft_model.set_adapter(REFERENCE, inference_mode=True)
        try:
            yield
        finally:
            peft_model.set_adapter(TRAINED)  # requires_grad back on the trained adapter only
    else:
        with peft_model.disable_adapter():
            yield


def trainable_summary(model) -> str:
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    train = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad
    )
    return f"LoRA: {train:,} trainable of {total:,} parameters ({100 * train / max(1, total):.2f} %)"


# ----------------------------------------------------------------------------- export


def merged_state_dict(peft_model, state: dict) -> dict:
    """The base model's state dict with each adapted weight replaced by W + scaling·B·A (fp32 math).

    `state` is the PeftModel's full state dict (keys `base_model.model.…`, ZeRO-3: gathered). The frozen
    reference adapter and the `original_module` copies of modules_to_save are dropped."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    layers = {n: mod for n, mod in peft_model.named_modules() if isinstance(mod, LoraLayer)}
    merged = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if ".lora_" in name or ".original_module." in name or f".modules_to_save.{REFERENCE}." in name:
            continue
        name = name.replace(f".modules_to_save.{TRAINED}.", ".")
        if ".base_layer." in name:
            module_key = key.rsplit(".base_layer.", 1)[0]
            name = name.replace(".base_layer.", ".")
            if name.endswith(".weight") and TRAINED in layers[module_key].lora_A:
                value = _merge_one(value, state, module_key, layers[module_key])
        merged[name] = value
    return merged


def _merge_one(weight: torch.Tensor, state: dict, module_key: str, layer) -> torch.Tensor:
    a = state[f"{module_key}.lora_A.{TRAINED}.weight"].float()
    b = state[f"{module_key}.lora_B.{TRAINED}.weight"].float()
    delta = (b @ a) * layer.scaling[TRAINED]
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return (weight.float() + delta).to(weight.dtype)


def export(peft_model, state: dict, tokenizer, final_dir: str, adapter_dir: str, load_in_4bit: bool) -> None:
    """Rank 0: adapter alone → adapter_dir (PeftModel.from_pretrained), merged model → final_dir."""
    tmp = adapter_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    adapter_state = {k: v for k, v in state.items() if ".lora_" in k or ".modules_to_save." in k}
    peft_model.save_pretrained(tmp, state_dict=adapter_state, selected_adapters=[TRAINED])
    _check_adapter_file(tmp)
    tokenizer.save_pretrained(tmp)
    _replace(tmp, adapter_dir)
    tmp = final_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if load_in_4bit:  # the 4-bit base is not the weights to merge into: reload the base in full precision
        merge_adapter_folder(adapter_dir, tmp)
    else:
        peft_model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(peft_model, state))
        tokenizer.save_pretrained(tmp)
    _replace(tmp, final_dir)


def _check_adapter_file(folder: str) -> None:
    """ZeRO-3 once wrote empty adapters elsewhere (trl#4416): refuse to export one."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path) if os.path.isfile(path) else {}
    if not tensors or any(t.numel() == 0 for t in tensors.values()):
        raise RuntimeError(
            f"the exported adapter {path} is empty or has empty tensors (ZeRO-3 gather failed)"
        )


def _replace(tmp: str, final: str) -> None:
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


# ----------------------------------------------------------------------------- adapter folders elsewhere


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def merge_adapter_folder(adapter_dir: str, out_dir: str) -> None:
    """Load the adapter's base on CPU, merge (peft merge_and_unload), save model + tokenizer to out_dir."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        base_path = json.load(f).get("base_model_name_or_path") or ""
    if not base_path:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base_model_name_or_path to merge into")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    tok_source = (
        adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else base_path
    )
    AutoTokenizer.from_pretrained(tok_source).save_pretrained(out_dir)


def resolve_model_folder(path: str, cache_root: str | None = None) -> str:
    """A model folder for generation/evaluation: `path` itself, or for a LoRA adapter folder the merged model
    in a cache folder (keyed by the adapter's fingerprint; built once, atomically)."""
    if not is_adapter_folder(path):
        return path
    root = (
        cache_root
        or os.environ.get("RAINBOWPO_MERGED_CACHE")
        or os.path.join(tempfile.gettempdir(), "rainbowpo-merged")
    )
    key = hashlib.sha256(f"{os.path.abspath(path)}:{model_fingerprint(path)}".encode()).hexdigest()[:16]
    folder = os.path.join(root, key)
    if os.path.isfile(os.path.join(folder, "COMPLETE")):
        return folder
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    merge_adapter_folder(path, tmp)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write(path)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
