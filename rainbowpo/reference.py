"""The reference model behind one small interface: online engine, precomputed cache, or none.

    ref = build_reference(cfg, dist, objective, examples, make_batch, grad_accum, attn)
    ref_logp, ref_entropy = ref.stats(batch)      # [S] each (entropy None unless contextual scaling)

Cached mode: one pass over the training set (sharded over ranks), stored under
`reference.cache_dir/<key>` where key = hash(reference weights fingerprint, dtype, token ids of every
pair, truncation settings, entropy flag). Later runs with the same key reuse it; the reference model
is then never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rainbowpo import engine as ds
from rainbowpo import lora
from rainbowpo.config import Config
from rainbowpo.fingerprint import model_fingerprint

CACHE_VERSION = 1


class NoReference:
    """Reference-free objectives (mix_alpha = 0, no contextual scaling): nothing is loaded."""

    def stats(self, batch):
        return None, None


class OnlineReference:
    def __init__(self, ref_engine: ds.ReferenceEngine, with_entropy: bool):
        self.ref, self.with_entropy = ref_engine, with_entropy

    def stats(self, batch):
        logp, entropy = self.ref.forward(batch, with_entropy=self.with_entropy)
        return logp.detach(), (entropy.detach() if entropy is not None else None)


class AdapterReference:
    """LoRA: π_ref is the policy itself with the adapter off (or the frozen starting adapter) — no second
    model. Same `forward`/`release` as ReferenceEngine, so the online and cached paths take either."""

    def __init__(self, policy: ds.PolicyEngine):
        self.policy = policy

    @torch.no_grad()
    def forward(self, batch, with_entropy: bool):
        model = self.policy.scorer.model
        with lora.reference_weights(model):
            return self.policy.evaluate(batch, with_entropy=with_entropy)  # eval mode: no dropout

    def release(self) -> None:
        """Nothing to free: the weights are the policy's."""


class CachedReference:
    """Per-pair reference numbers looked up by row id: logp/entropy tables of shape [N, 2] (chosen, rejected)."""

    def __init__(self, logp: torch.Tensor, entropy: torch.Tensor | None):
        self.logp, self.entropy = logp, entropy

    def stats(self, batch):
        rows = batch.row_ids.to(self.logp.device)
        device = batch.input_ids.device
        logp = self.logp[rows].reshape(-1).to(device)  # [B, 2] → [2B]: chosen 2i, rejected 2i+1
        entropy = self.entropy[rows].reshape(-1).to(device) if self.entropy is not None else None
        return logp, entropy


def build_reference(
    cfg: Config,
    dist: ds.DistInfo,
    with_entropy: bool,
    examples: Sequence,
    make_batch: Callable,
    grad_accum: int,
    attn_implementation: str,
    policy: ds.PolicyEngine | None = None,
):
    """`policy` is needed with LoRA: its base weights (adapter off) are the reference."""
    mode = cfg.reference_mode()
    if mode == "none":
        return NoReference()

    def make_ref():
        if cfg.model.uses_lora():
            return AdapterReference(policy)
        return ds.ReferenceEngine.build(cfg, dist, grad_accum, attn_implementation)

    if mode == "online":
        return OnlineReference(make_ref(), with_entropy)
    key = cache_key(cfg, examples, with_entropy)
    folder = os.path.join(cfg.reference_cache_dir(), key)
    if not os.path.isfile(os.path.join(folder, "COMPLETE")):
        ref = make_ref()
        logp, entropy = _reference_pass(
            ref, dist, examples, make_batch, cfg.train.micro_batch_pairs, with_entropy
        )
        ref.release()
        if dist.is_main:
            _write_cache(folder, key, logp, entropy)
        ds.barrier()
    return _read_cache(folder, key, len(examples), with_entropy)


def cache_key(cfg: Config, examples: Sequence, with_entropy: bool) -> str:
    h = hashlib.sha256()
    settings = {
        "version": CACHE_VERSION,
        "model": model_fingerprint(cfg.reference_path()),
        "dtype": cfg.model.dtype,
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "truncation_keep_eos": cfg.data.truncation_keep_eos,
        "entropy": with_entropy,
    }
    if cfg.model.adapter_path:  # LoRA from a trained adapter: π_ref is that adapter (a fresh one: the base)
        settings["adapter"] = model_fingerprint(cfg.model.adapter_path)
    if cfg.model.load_in_4bit:
        settings["load_in_4bit"] = True
    h.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        h.update(repr((ex.row_id, ex.prompt_ids, ex.chosen_ids, ex.rejected_ids)).encode())
    return h.hexdigest()[:24]


def _reference_pass(ref, dist, examples, make_batch, micro_pairs, with_entropy):
    """Every rank scores its shard; ranks run the same number of forwards (ZeRO-3 gathers are collective)."""
    shard = list(range(dist.rank, len(examples), dist.world_size))
    chunks = [shard[i : i + micro_pairs] for i in range(0, len(shard), micro_pairs)]
    n_forwards = max(ds.all_gather_objects(len(chunks)))
    results: dict[int, list[float]] = {}
    bar = tqdm(total=n_forwards, desc="reference cache", disable=not dist.is_main)
    for i in range(n_forwards):
        chunk = chunks[i] if i < len(chunks) else chunks[-1] if chunks else [0]
        batch = make_batch([examples[j] for j in chunk]).to(dist.device)
        logp, entropy = ref.forward(batch, with_entropy=with_entropy)
        if i < len(chunks):  # a repeated chunk only keeps the collective forwards in step
            lp = logp.tolist()
            ent = entropy.tolist() if entropy is not None else [0.0] * len(lp)
            for k, j in enumerate(chunk):
                results[examples[j].row_id] = [lp[2 * k], lp[2 * k + 1], ent[2 * k], ent[2 * k + 1]]
        bar.update(1)
    bar.close()
    merged: dict[int, list[float]] = {}
    for part in ds.all_gather_objects(results):
        merged.update(part)
    table = torch.tensor([merged[ex.row_id] for ex in examples], dtype=torch.float64)
    return table[:, :2].contiguous(), (table[:, 2:].contiguous() if with_entropy else None)


def _write_cache(folder: str, key: str, logp: torch.Tensor, entropy: torch.Tensor | None) -> None:
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    tensors = {"logp": logp} | ({"entropy": entropy} if entropy is not None else {})
    save_file(tensors, os.path.join(tmp, "reference.safetensors"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"key": key, "rows": int(logp.shape[0])}, f)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write(key)
    if os.path.isdir(folder):  # a stale incomplete folder
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _read_cache(folder: str, key: str, rows: int, with_entropy: bool) -> CachedReference:
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"meta.json holds a {type(meta).__name__}, not an object")
        tensors = load_file(os.path.join(folder, "reference.safetensors"))
    except Exception as exc:  # OSError, JSON, safetensors header errors: one line, one fix
        raise ValueError(
            f"reference cache {folder} is unreadable ({type(exc).__name__}: {exc}); delete the folder to rebuild it"
        ) from None
    if meta.get("key") != key or meta.get("rows") != rows:
        raise ValueError(
            f"reference cache {folder} was built for other weights/data (key {meta.get('key')} rows "
            f"{meta.get('rows')}, expected {key} rows {rows}); delete it or set reference.cache_dir elsewhere"
        )
    for name in ("logp",) + (("entropy",) if "entropy" in tensors else ()):
        if name not in tensors or tuple(tensors[name].shape) != (rows, 2):
            shape = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(
                f"reference cache {folder}: {name} table is {shape}, expected ({rows}, 2); "
                "delete the folder to rebuild it"
            )
    if with_entropy and "entropy" not in tensors:
        raise ValueError(f"reference cache {folder} has no entropies but contextual scaling needs them")
    return CachedReference(tensors["logp"], tensors.get("entropy"))
