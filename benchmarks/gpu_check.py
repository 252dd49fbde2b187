"""The GPU path, executed: numerics, throughput/MFU, memory by reference mode and ZeRO stage, vLLM.

    bash benchmarks/gpu_check.sh                 # on one GPU (H200-class: < 8 min), prints one table
    bash benchmarks/gpu_check.sh --dry-run       # CPU, tiny shapes, fp32, no flash-attn: what CI runs
    bash benchmarks/gpu_check.sh --out docs/gpu_check.md   # also write the table (with date and machine)

Random-init Llama-shaped models built from configs (no network). Rows:
1. packed (flash-attention 2 varlen) vs padded log-probs and loss, bf16, ~0.5B model (benchmarks/gpu_numerics.py)
2. chunked LM-head recompute (keep_logits_mb 0, vocab 128k) vs kept logits: gradients, fp32
3. online DPO and RainbowPO (entropies on), ~1.2B model, 2k-token sequences: tokens/s and MFU (the reference
   forward counted); target MFU ≥ 40 %
4. peak memory and tokens/s for online / cached / offloaded reference under ZeRO-2 and ZeRO-3
5. data_prep generate --engine vllm on the ~0.5B model: candidate tokens/s (engine start included)
Exit status 1 when a numerics check fails or any section errors; throughput targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import gpu_numerics  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
MFU_TARGET = 0.40
WORDS = "alpha beta gamma delta one two three four red green blue sort list answer yes no".split()

SHAPES = {  # GPU shapes per the issue; dry-run shapes keep every code path at toy size
    "gpu": {
        "numerics": dict(hidden=1024, layers=24, heads=16, kv_heads=8, ffn=2816, vocab=32000,
                         prompt=(256, 1024), response=(128, 1024)),
        "head": dict(hidden=1024, layers=2, heads=16, kv_heads=8, ffn=2816, vocab=128256,
                     prompt=(64, 256), response=(256, 512), chunk=1024),
        "train": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, tied=True,
                      max_length=2048, prompt_length=1024, words=1500, steps=4),
        "vllm": dict(prompts=64, n=8, max_new_tokens=256),
    },
    "dry": {
        "numerics": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512,
                         prompt=(4, 24), response=(2, 16)),
        "head": dict(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, vocab=4096,
                     prompt=(4, 16), response=(8, 24), chunk=16),
        "train": dict(hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, vocab=300, tied=True,
                      max_length=96, prompt_length=48, words=80, steps=2),
        "vllm": dict(prompts=8, n=2, max_new_tokens=16, model=dict(  # vLLM's CPU kernels need head dim ≥ 32
            hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, vocab=300)),
    },
}  # fmt: skip

TRAIN_RUNS = [  # (label, preset, reference mode, offload, ZeRO preset); the first two give the MFU rows
    ("DPO, online reference, ZeRO-3", "dpo", "online", False, "zero3"),
    ("RainbowPO (entropies), online reference, ZeRO-3", "rainbowpo", "online", False, "zero3"),
    ("DPO, cached reference, ZeRO-3", "dpo", "cached", False, "zero3"),
    ("DPO, offloaded reference, ZeRO-3", "dpo", "online", True, "zero3"),
    ("DPO, online reference, ZeRO-2", "dpo", "online", False, "zero2"),
    ("DPO, cached reference, ZeRO-2", "dpo", "cached", False, "zero2"),
    ("DPO, offloaded reference, ZeRO-2", "dpo", "online", True, "zero2"),
]


# ----------------------------------------------------------------------------- FLOPs and MFU


def matmul_params(shape: dict) -> int:
    """Parameters that take part in a matmul per token: attention, MLP and the LM head (not the lookup)."""
    d, L, ffn = shape["hidden"], shape["layers"], shape["ffn"]
    kv = d // shape["heads"] * shape["kv_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ffn  # q, o; k, v; gate, up, down
    return L * per_layer + d * shape["vocab"]


def flops_per_token(shape: dict, seq_len: int, reference_forward: bool) -> float:
    """Training FLOPs per policy token: 6N (forward + backward of the matmuls) + 6·L·T·d (causal attention:
    QKᵀ and AV over T/2 keys on average, 2·L·T·d forward, ×3 with backward); an online reference adds
    its forward, 2N + 2·L·T·d (PaLM's accounting, Chowdhery et al. 2022, App. B, halved for causality)."""
    n, attn = matmul_params(shape), shape["layers"] * seq_len * shape["hidden"]
    train = 6 * n + 6 * attn
    return train + (2 * n + 2 * attn if reference_forward else 0)


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------- workspace


def build_workspace(work: Path, shape: dict, dtype: torch.dtype) -> tuple[Path, Path]:
    """Tokenizer + random-init model folder and a pairs file whose sequences fill max_length."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rainbowpo.tiny import train_bpe

    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    tok = train_bpe([text(12) for _ in range(300)], str(work / "model"), vocab_size=300)
    config = LlamaConfig(
        vocab_size=max(shape["vocab"], len(tok)), hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=8192,
        tie_word_embeddings=shape.get("tied", False), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(work / "model")
    pairs = work / "pairs.jsonl"
    words = shape.get("words", 40)
    with open(pairs, "w") as f:
        for _ in range(64):
            row = {"prompt": text(words), "chosen": text(words), "rejected": text(words) + " no"}
            f.write(json.dumps(row) + "\n")
    return work / "model", pairs


# ----------------------------------------------------------------------------- sections


def section_numerics(shapes: dict, device, dtype) -> list[dict]:
    rows = [gpu_numerics.packed_vs_padded(shapes["numerics"], device, dtype)]
    rows.append(gpu_numerics.chunked_head_grads(shapes["head"], device))
    return rows


def train_overrides(model: Path, pairs: Path, shape: dict, out: Path, dtype_name: str, run: tuple) -> list:
    _, preset, mode, offload, zero = run
    return [
        f"model.path={model}", f"model.dtype={dtype_name}", f"data.train=[{pairs}]",
        f"data.max_length={shape['max_length']}", f"data.max_prompt_length={shape['prompt_length']}",
        f"objective.preset={preset}", f"reference.mode={mode}", f"reference.offload={str(offload).lower()}",
        f"reference.cache_dir={out}/ref_cache", f"deepspeed.config={zero}", "train.global_batch_pairs=8",
        "train.micro_batch_pairs=2", "train.lr=1e-6", "train.warmup_ratio=0", f"train.max_steps={shape['steps']}",
        f"output.dir={out}/run", "output.checkpoints=false", "output.export=false", "logging.progress=false",
    ]  # fmt: skip


def run_probe(overrides: list[str], timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each probe is a world of its own
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_train_probe.py"), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("GPU_PROBE ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"training probe exited {done.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1][len("GPU_PROBE ") :])


def section_training(shapes: dict, work: Path, dtype, dtype_name: str, peak: float | None) -> list[dict]:
    shape = shapes["train"]
    model, pairs = build_workspace(work / "train_ws", shape, dtype)
    rows = []
    for run in TRAIN_RUNS:
        out = work / re.sub(r"\W+", "_", run[0])
        try:
            probe = run_probe(train_overrides(model, pairs, shape, out, dtype_name, run), timeout=300)
        except Exception as exc:  # one failing configuration must not hide the others
            rows.append({"check": run[0], "value": None, "ok": False, "detail": str(exc)[:300]})
            continue
        flops = flops_per_token(shape, shape["max_length"], reference_forward=run[2] == "online")
        mfu = probe["tokens_per_second"] * flops / peak if peak else None
        rows.append({
            "check": run[0], "value": probe["tokens_per_second"], "unit": "tokens/s", "peak_gib": probe["peak_gib"],
            "mfu": mfu, "target": f"MFU ≥ {MFU_TARGET:.0%}" if run in TRAIN_RUNS[:2] else "",
            "ok": True, "detail": f"{probe['steps']} steps, {flops:.3g} FLOP/token",
        })  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    return rows


def vllm_python() -> str | None:
    for candidate in (ROOT / ".venv-vllm" / "bin" / "python", Path(sys.executable)):
        if (
            candidate.exists()
            and subprocess.run([str(candidate), "-c", "import vllm"], capture_output=True).returncode == 0
        ):
            return str(candidate)
    return None


def section_vllm(shapes: dict, work: Path, dtype, on_gpu: bool) -> list[dict]:
    python = vllm_python()
    if python is None:
        return [{"check": "data_prep generate --engine vllm", "value": None, "ok": not on_gpu,
                 "detail": "vllm not importable (bash launch/setup_env.sh --vllm)"}]  # fmt: skip
    shape = {**shapes["vllm"].get("model", shapes["numerics"]), "words": 30}
    model, _ = build_workspace(work / "vllm_ws", shape, dtype)
    prompts = work / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(shapes["vllm"]["prompts"]):
            f.write(json.dumps({"id": str(i), "prompt": " ".join(WORDS[i % 7 :] + WORDS[: i % 5])}) + "\n")
    v = shapes["vllm"]
    cmd = [python, "-m", "data_prep.generate", "--engine", "vllm", "--model", str(model), "--prompts",
           str(prompts), "--out", str(work / "candidates"), "--n", str(v["n"]), "--max-new-tokens",
           str(v["max_new_tokens"]), "--gpu-memory-utilization", "0.5" if on_gpu else "0.1"]  # fmt: skip
    clock = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    wall = time.perf_counter() - clock
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return [{"check": "data_prep generate --engine vllm", "value": None, "ok": False,
                 "detail": f"exit {done.returncode}: {' | '.join(tail)}"}]  # fmt: skip
    tokens = candidate_tokens(model, work / "candidates")
    return [{"check": "data_prep generate --engine vllm", "value": tokens / wall, "unit": "candidate tokens/s",
             "ok": True, "detail": f"{tokens} tokens in {wall:.1f} s wall (engine start included)"}]  # fmt: skip


def candidate_tokens(model: Path, folder: Path) -> int:
    from transformers import AutoTokenizer

    from data_prep.common import read_parts

    tok = AutoTokenizer.from_pretrained(model)
    rows = read_parts(str(folder))
    return sum(len(tok(c, add_special_tokens=False).input_ids) for r in rows for c in r["candidates"])


# ----------------------------------------------------------------------------- table


def format_value(row: dict) -> str:
    if row.get("value") is None:
        return "—"
    if "tolerance" in row:
        return f"{row['value']:.2e} (tol {row['tolerance']:.1e})"
    text = f"{row['value']:,.0f} {row.get('unit', '')}".strip()
    if row.get("peak_gib") is not None:
        text += f", peak {row['peak_gib']:.1f} GiB"
    if row.get("mfu") is not None:
        text += f", MFU {row['mfu']:.1%}"
    return text


def verdict(row: dict) -> str:
    if not row["ok"]:
        return "FAIL" if row.get("value") is not None or "tolerance" in row else "ERROR"
    if row.get("mfu") is not None and row.get("target"):
        return "ok" if row["mfu"] >= MFU_TARGET else f"below target ({row['target']})"
    return "ok"


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| check | measured | result | detail |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {format_value(r)} | {verdict(r)} | {r.get('detail', '')} |" for r in rows]
    return "\n".join(lines)


def guarded(name: str, fn, *args) -> list[dict]:
    clock = time.perf_counter()
    try:
        rows = fn(*args)
    except Exception as exc:  # report and go on: one broken section must not hide the rest
        rows = [{"check": name, "value": None, "ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}]
    print(f"[gpu_check] {name}: {time.perf_counter() - clock:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32 (CI)")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    p.add_argument("--skip", default="", help="comma list of sections to skip: numerics,training,vllm")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        p.error("no CUDA device: run with --dry-run (CPU, tiny shapes)")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype, dtype_name = (torch.bfloat16, "bf16") if on_gpu else (torch.float32, "fp32")
    shapes = SHAPES["gpu" if on_gpu else "dry"]
    machine = (
        torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    )
    peak = peak_flops(machine, args.peak_tflops) if on_gpu else None
    skip = set(filter(None, args.skip.split(",")))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        if "numerics" not in skip:
            rows += guarded("numerics", section_numerics, shapes, device, dtype)
        if "training" not in skip:
            rows += guarded("training", section_training, shapes, work, dtype, dtype_name, peak)
        if "vllm" not in skip:
            rows += guarded("vllm", section_vllm, shapes, work, dtype, on_gpu)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "dry run (CPU, tiny shapes, fp32)" if args.dry_run else "GPU"
    header = f"GPU check — {mode}, {stamp}, {machine}, torch {torch.__version__}"
    text = table(rows, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
