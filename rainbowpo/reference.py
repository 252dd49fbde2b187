"""The reference model behind one small interface: online engine, precomputed cache, or none.

    ref = build_reference(cfg, dist, objective, examples, make_batch, grad_accum, attn, eval_examples)
    ref_logp, ref_entropy = ref.stats(batch, "train")  # [S] each (entropy None unless contextual scaling)

Cached mode: one pass over the training and the eval set together (sharded over ranks), one table per
split, looked up by (split, row id) — an eval pair is never scored with a training pair's numbers.
Stored under `reference.cache_dir/<key>` where key = hash(reference weights fingerprint, dtype, token
ids of every pair of both splits, truncation settings, entropy flag). Later runs with the same key reuse
it; the reference model is then never loaded.
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

CACHE_VERSION = 2  # 2: an eval table next to the training one, rows keyed by (split, row)


class NoReference:
    """Reference-free objectives (mix_alpha = 0, no contextual scaling): nothing is loaded."""

    def stats(self, batch, split: str = "train"):
        return None, None


class OnlineReference:
    def __init__(self, ref_engine: ds.ReferenceEngine, with_entropy: bool):
        self.ref, self.with_entropy = ref_engine, with_entropy

    def stats(self, batch, split: str = "train"):
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
    """Per-pair reference numbers looked up by (split, row id): per split, logp/entropy tables of shape
    [N, 2] (chosen, rejected)."""

    def __init__(self, logp: torch.Tensor, entropy: torch.Tensor | None, eval_logp=None, eval_entropy=None):
        self.tables = {"train": (logp, entropy), "eval": (eval_logp, eval_entropy)}
        self.logp, self.entropy = logp, entropy

    def stats(self, batch, split: str = "train"):
        logp_table, entropy_table = self.tables[split]
        if logp_table is None:
            raise ValueError(f"the reference cache has no {split} table (it was built without data.{split})")
        rows = batch.row_ids.to(logp_table.device)
        device = batch.input_ids.device
        logp = logp_table[rows].reshape(-1).to(device)  # [B, 2] → [2B]: chosen 2i, rejected 2i+1
        entropy = entropy_table[rows].reshape(-1).to(device) if entropy_table is not None else None
        return logp, entropy


def build_reference(
    cfg: Config,
    dist: ds.DistInfo,
    with_entropy: bool,
    examples: Sequence,
    make_batch: Callable,
    grad_accum: int,
    attn_implementation: str,
    eval_examples: Sequence = (),
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
    key = cache_key(cfg, examples, with_entropy, eval_examples)
    folder = os.path.join(cfg.reference_cache_dir(), key)
    if not os.path.isfile(os.path.join(folder, "COMPLETE")):
        ref = make_ref()
        items = [("train", ex) for ex in examples] + [("eval", ex) for ex in eval_examples]
        tables = _reference_pass(ref, dist, items, make_batch, cfg.train.micro_batch_pairs, with_entropy)
        ref.release()
        if dist.is_main:
            _write_cache(folder, key, tables)
        ds.barrier()
    return _read_cache(folder, key, len(examples), with_entropy, eval_rows=len(eval_examples))


def cache_key(cfg: Config, examples: Sequence, with_entropy: bool, eval_examples: Sequence = ()) -> str:
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
    for split, exs in (("train", examples), ("eval", eval_examples)):
        h.update(f"{split} {len(exs)}".encode())
        for ex in exs:
            h.update(repr((ex.row_id, ex.prompt_ids, ex.chosen_ids, ex.rejected_ids)).encode())
    return h.hexdigest()[:24]


def _reference_pass(ref, dist, items, make_batch, micro_pairs, with_entropy) -> dict:
    """(split, example) items → {split: (logp [N, 2], entropy [N, 2] | None)}, rows in each split's order.

    Every rank scores its shard; ranks run the same number of forwards (ZeRO-3 gathers are collective)."""
    shard = list(range(dist.rank, len(items), dist.world_size))
    chunks = [shard[i : i + micro_pairs] for i in range(0, len(shard), micro_pairs)]
    n_forwards = max(ds.all_gather_objects(len(chunks)))
    results: dict[int, list[float]] = {}
    bar = tqdm(total=n_forwards, desc="reference cache", disable=not dist.is_main)
    for i in range(n_forwards):
        chunk = chunks[i] if i < len(chunks) else chunks[-1] if chunks else [0]
        batch = make_batch([items[j][1] for j in chunk]).to(dist.device)
        logp, entropy = ref.forward(batch, with_entropy=with_entropy)
        if i < len(chunks):  # a repeated chunk only keeps the collective forwards in step
            lp = logp.tolist()
            ent = entropy.tolist() if entropy is not None else [0.0] * len(lp)
            for k, j in enumerate(chunk):
                split, ex = items[j]
                results[(split, ex.row_id)] = [lp[2 * k], lp[2 * k + 1], ent[2 * k], ent[2 * k + 1]]
        bar.update(1)
    bar.close()
    merged: dict[tuple[str, int], list[float]] = {}
    for part in ds.all_gather_objects(results):
        merged.update(part)
    tables = {}
    for name in ("train", "eval"):
        keys = [(split, ex.row_id) for split, ex in items if split == name]
        table = torch.tensor([merged[k] for k in keys], dtype=torch.float64).reshape(len(keys), 4)
        tables[name] = (table[:, :2].contiguous(), table[:, 2:].contiguous() if with_entropy else None)
    return tables


def _write_cache(folder: str, key: str, tables: dict) -> None:
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    tensors = {}
    for split, prefix in (("train", ""), ("eval", "eval_")):
        logp, entropy = tables[split]
        if len(logp):
            tensors[prefix + "logp"] = logp
            tensors |= {prefix + "entropy": entropy} if entropy is not None else {}
    save_file(tensors, os.path.join(tmp, "reference.safetensors"))
    rows = {"rows": int(tables["train"][0].shape[0]), "eval_rows": int(tables["eval"][0].shape[0])}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"key": key, **rows}, f)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write(key)
    if os.path.isdir(folder):  # a stale incomplete folder
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _read_cache(folder: str, key: str, rows: int, with_entropy: bool, eval_rows: int = 0) -> CachedReference:
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
    if meta.get("key") != key or meta.get("rows") != rows or meta.get("eval_rows", 0) != eval_rows:
        raise ValueError(
            f"reference cache {folder} was built for other weights/data (key {meta.get('key')} rows "
            f"{meta.get('rows')}, expected {key} rows {rows}); delete it or set reference.cache_dir elsewhere"
        )
    for name, n in (("logp", rows), ("entropy", rows), ("eval_logp", eval_rows), ("eval_entropy", eval_rows)):
        if n == 0 or (name.endswith("entropy") and name not in tensors):
            continue
        if name not in tensors or tuple(tensors[name].shape) != (n, 2):
            shape = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(
                f"reference cache {folder}: {name} table is {shape}, expected ({n}, 2); "
                "delete the folder to rebuild it"
            )
    if with_entropy and "entropy" not in tensors:
        raise ValueError(f"reference cache {folder} has no entropies but contextual scaling needs them")
    return CachedReference(
        tensors["logp"], tensors.get("entropy"), tensors.get("eval_logp"), tensors.get("eval_entropy")
    )
