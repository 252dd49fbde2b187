"""Throughput and memory of our trainer against TRL and the bare bound, side by side in one run.

    python benchmarks/bench_train.py                       # all configs once, table printed
    python benchmarks/bench_train.py --repeat 3 --write    # 3 runs each, appended to docs/benchmarks.md
    python benchmarks/bench_train.py --only ours-dpo-cached,bare-bound

Workload: ../shared/bench/make_workload.py (256 pairs, random tiny Llama, vocab 8192, 95,506 tokens), made
once under --workload. Every config runs in its own process on identical batches: 8 pairs per step, one
epoch (32 steps), fp32, 2 threads, the order of TRL's sampler (torch.randperm seeded 0; ours reads the
rows in that order with train.shuffle false). tokens/s = the workload's non-pad tokens / wall seconds.
LoRA rows (r 16, alpha 32, all attention/MLP linear layers) are compared with trl-sigmoid-lora, TRL's
DPOTrainer given the same peft_config and no reference copy.

Wall clock, like the anchors: models are loaded before the clock; tokenization and every training step are
on it. For the cached reference the one-off cache pass is reported as cache_s and not on the wall clock
(TRL's precompute variant counts it; ours is reused across runs). The losses of ours and TRL's must agree
(same math, same batches): the table shows both, and --check fails the run when they differ by > 1e-3.

Whole process (issue 15 part 7): every config runs in its own child; the driver waits for it with os.wait4
and reports the child's max RSS (imports, model load, data, training: everything) and its wall seconds from
spawn to exit. `ours-dpo-cli` is a plain `python -m rainbowpo.train` (DPO, online reference, our defaults)
on the same settings; `trl-sigmoid-gc` is TRL's lowest-memory DPO config (gradient checkpointing on).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rainbowpo.host import retain_env  # ctypes only: the benchmark driver stays light

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
OURS = {  # name → config overrides on top of common_overrides(); data.share_prompt unset = our default (on)
    "ours-dpo-online": {"objective.preset": "dpo", "reference.mode": "online"},
    "ours-dpo-online-unshared": {
        "objective.preset": "dpo",
        "reference.mode": "online",
        "data.share_prompt": False,
    },
    "ours-dpo-cached-unshared": {
        "objective.preset": "dpo",
        "reference.mode": "cached",
        "data.share_prompt": False,
    },
    "ours-dpo-cached-shared": {
        "objective.preset": "dpo",
        "reference.mode": "cached",
        "data.share_prompt": True,
    },
    "ours-rainbowpo-online": {"objective.preset": "rainbowpo", "reference.mode": "online"},
    "ours-simpo": {"objective.preset": "simpo", "reference.mode": "none"},
    # LoRA r 16, alpha 32, dropout 0 on every attention/MLP linear layer; reference = the adapter-off base
    "ours-lora-dpo-online": {
        "objective.preset": "dpo",
        "reference.mode": "online",
        "model.lora.r": 16,
        "model.lora.alpha": 32,
    },  # fmt: skip
    "ours-lora-dpo-online-peft": {  # the same with peft's own lora.Linear forward (no rainbowpo.lora_fused)
        "objective.preset": "dpo",
        "reference.mode": "online",
        "model.lora.r": 16,
        "model.lora.alpha": 32,
        "model.lora.fused": False,
    },
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANCHORS = {
    "trl-sigmoid": [str(BENCH / "trl_anchor.py"), "--config", "trl-sigmoid"],
    "trl-sigmoid-gc": [str(BENCH / "trl_anchor.py"), "--config", "trl-sigmoid-gc"],
    "bare-bound": [str(BENCH / "bare_bound.py")],
    "bare-bound-retain": [str(BENCH / "bare_bound.py")],
    "trl-sigmoid-lora": [__file__, "--trl-lora"],  # TRL's anchor with the same peft_config as ours-lora-*
}
# The bound again with the allocator setting our trainer makes on CPU (rainbowpo.host), as glibc tunables:
# how much of our lead over the bound is that setting rather than the training path.
ANCHOR_ENV = {"bare-bound-retain": retain_env()}
# Our trainer as a user starts it: `python -m rainbowpo.train key=value ...` (one rank), measured from outside.
OURS_CLI = {"ours-dpo-cli": {"objective.preset": "dpo", "reference.mode": "online"}}
ORDER = [
    "trl-sigmoid",
    "trl-sigmoid-gc",
    "bare-bound",
    "bare-bound-retain",
    *OURS,
    *OURS_CLI,
    "trl-sigmoid-lora",
]


def common_overrides(workload: Path, out: Path) -> dict:
    """The settings of the TRL anchor, in our config keys."""
    return {
        "model.path": workload / "model+tokenizer", "model.dtype": "fp32", "model.gradient_checkpointing": False,
        "data.train": workload / "train_trl_order.jsonl", "data.max_length": 512, "data.max_prompt_length": 256,
        "train.global_batch_pairs": 8, "train.micro_batch_pairs": 8, "train.epochs": 1, "train.shuffle": False,
        "train.lr": 5e-6, "train.lr_schedule": "linear", "train.warmup_ratio": 0.0, "train.seed": 0,
        "objective.beta": 0.1, "reference.offload": False, "reference.cache_dir": out / "cache",
        "deepspeed.config": "zero0", "output.dir": out, "output.checkpoints": False, "output.export": False,
        "logging.progress": False,
    }  # fmt: skip


def prepare_workload(workload: Path) -> dict:
    """Make the shared workload once; add a model folder holding the tokenizer and the rows in TRL's order."""
    if not (workload / "workload.json").exists():
        subprocess.run([sys.executable, str(BENCH / "make_workload.py"), "--out", str(workload)], check=True)
    combined = workload / "model+tokenizer"
    if not combined.exists():
        combined.mkdir()
        for folder in ("model", "tokenizer"):
            for f in (workload / folder).iterdir():
                (combined / f.name).symlink_to(f.resolve())
    ordered = workload / "train_trl_order.jsonl"
    if not ordered.exists():
        import torch

        rows = (workload / "train.jsonl").read_text().splitlines()
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        ordered.write_text("".join(rows[i] + "\n" for i in order))
    return json.loads((workload / "workload.json").read_text())


def run_ours(name: str, workload: Path, out: Path) -> dict:
    """One of OURS in this process (one rank, ZeRO-0): the JSON line of the anchors, plus our breakdown."""
    import torch

    from rainbowpo import train
    from rainbowpo.config import load_config
    from rainbowpo.metrics import read_metrics

    shutil.rmtree(out, ignore_errors=True)  # a fresh reference cache: its pass is measured every time
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("BENCH_PORT", "29533"))  # fmt: skip
    torch.set_num_threads(2)
    overrides = {**common_overrides(workload, out), **OURS[name]}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    run = train.setup(cfg)
    t0 = time.perf_counter()
    train.loop(run)
    loop_s = time.perf_counter() - t0
    wall = loop_s + run.timings["data_s"]
    wl = json.loads((workload / "workload.json").read_text())
    losses = [r["loss"] for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r]
    first = read_metrics(str(out / "metrics.jsonl"))[0]
    return {
        "config": name, "wall_s": round(wall, 2), "tokens_per_s": round(wl["train_tokens"] / wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_s": round(cpu_seconds(), 1), "final_loss": round(losses[-1], 5), "mean_train_loss": round(statistics.fmean(losses), 5),
        "steps": len(losses), "first_batch_mean_chosen_logp": round(first["logps/chosen"], 1),
        "data_s": round(run.timings["data_s"], 2), "loop_s": round(loop_s, 2),
        "cache_s": round(run.timings.get("reference_s", 0.0), 2) if cfg.reference.mode == "cached" else 0.0,
    }  # fmt: skip


def run_trl_lora(workload: Path, out_dir: str) -> None:
    """../shared/bench/trl_anchor.py's trl-sigmoid run with `peft_config` = our LoRA settings and no reference
    copy (TRL then uses the adapter-disabled policy as the reference, as ours does)."""
    sys.path.insert(0, str(BENCH))
    import trl_anchor
    from peft import LoraConfig

    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             bias="none", task_type="CAUSAL_LM")  # fmt: skip

    class LoraDPOTrainer(trl_anchor.DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, peft_config=peft_config, **kwargs)

    trl_anchor.DPOTrainer = LoraDPOTrainer
    trl_anchor.CONFIGS["trl-sigmoid-lora"] = ({"loss_type": "sigmoid"}, False)  # False: no reference copy
    sys.argv = [
        "trl_anchor.py",
        "--workload",
        str(workload),
        "--config",
        "trl-sigmoid-lora",
        "--out-dir",
        out_dir,
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trl_anchor.main()
    result = json.loads([line for line in printed.getvalue().splitlines() if line.startswith("{")][-1])
    print(json.dumps({**result, "cpu_s": round(cpu_seconds(), 1)}))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far: less sensitive than wall time to a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cli_result(name: str, workload: Path, out: Path) -> dict:
    """The JSON line of a `python -m rainbowpo.train` run, read from its metrics (wall and RSS come from
    the driver's os.wait4)."""
    from rainbowpo.metrics import read_metrics

    rows = [r for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r]
    losses = [r["loss"] for r in rows]
    return {"config": name, "final_loss": round(losses[-1], 5), "mean_train_loss": round(statistics.fmean(losses), 5),
            "steps": len(losses), "first_batch_mean_chosen_logp": round(rows[0]["logps/chosen"], 1)}  # fmt: skip


def run_config(name: str, workload: Path, scratch: Path) -> dict:
    """Each config in a fresh process; the last stdout line is its JSON result, plus the whole process's
    wall seconds and max RSS (os.wait4 on the child)."""
    out = scratch / name
    cli = name in OURS_CLI
    if cli:
        shutil.rmtree(out, ignore_errors=True)
        overrides = {**common_overrides(workload, out), **OURS_CLI[name]}
        cmd = [sys.executable, "-m", "rainbowpo.train", *(f"{k}={v}" for k, v in overrides.items())]
    elif name in ANCHORS:
        cmd = [sys.executable, *ANCHORS[name], "--workload", str(workload)]
        if name.startswith("trl"):
            cmd += ["--out-dir", str(out)]
    else:
        cmd = [
            sys.executable,
            __file__,
            "--ours",
            name,
            "--workload",
            str(workload),
            "--scratch",
            str(scratch),
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
        **ANCHOR_ENV.get(name, {}),
    }
    if cli:  # a lone process: the rendezvous variables the deepspeed launcher would set
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=os.environ.get("BENCH_PORT") or str(_free_port()))  # fmt: skip
    returncode, stdout, stderr, wall, max_rss_kib = _run_measured(cmd, env, scratch / f"{name}.log")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode != 0 or not (lines or cli):
        raise SystemExit(f"{name} failed ({returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = cli_result(name, workload, out) if cli else json.loads(lines[-1])
    wl = json.loads((workload / "workload.json").read_text())
    result.update(process_s=round(wall, 2), process_tokens_per_s=round(wl["train_tokens"] / wall, 1),
                  process_max_rss_mib=round(max_rss_kib / 1024, 1))  # fmt: skip
    if cli:  # no inner clock: the whole process is the measurement
        result.update(wall_s=result["process_s"], tokens_per_s=result["process_tokens_per_s"],
                      peak_rss_mib=result["process_max_rss_mib"])  # fmt: skip
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # a fixed port clashes with other runs on a shared machine
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_measured(cmd: list[str], env: dict, log: Path) -> tuple[int, str, str, float, int]:
    """Run `cmd`, output to files (no pipe to fill), reaped with os.wait4: (rc, stdout, stderr, wall s,
    max RSS KiB of the child)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    err_path = log.with_suffix(".err")
    with open(log, "w") as out_f, open(err_path, "w") as err_f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: keep Popen from waiting again
    return proc.returncode, log.read_text(), err_path.read_text(), wall, usage.ru_maxrss


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Median over repeats per config and the ratios to TRL and to the bare bound."""
    rows = []
    for name, runs in results.items():
        keys = (
            "wall_s",
            "tokens_per_s",
            "peak_rss_mib",
            "process_s",
            "process_tokens_per_s",
            "process_max_rss_mib",
        )
        row = {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}
        row.update(config=name, runs=len(runs), mean_train_loss=runs[0].get("mean_train_loss"),
                   cache_s=runs[0].get("cache_s", runs[0].get("precompute_s", 0.0)))  # fmt: skip
        rows.append(row)
    by_name = {r["config"]: r for r in rows}
    for r in rows:
        trl = "trl-sigmoid-lora" if "lora" in r["config"] and "trl-sigmoid-lora" in by_name else "trl-sigmoid"
        for anchor, key in ((trl, "vs_trl"), ("bare-bound", "vs_bare")):
            if anchor in by_name:
                r[key + "_speed"] = r["tokens_per_s"] / by_name[anchor]["tokens_per_s"]
                r[key + "_rss"] = r["peak_rss_mib"] / by_name[anchor]["peak_rss_mib"]
        gc = by_name.get("trl-sigmoid-gc", {})
        if gc.get("process_max_rss_mib") and r.get("process_max_rss_mib"):
            r["vs_trl_gc_process_rss"] = r["process_max_rss_mib"] / gc["process_max_rss_mib"]
            r["vs_trl_gc_process_speed"] = r["process_tokens_per_s"] / gc["process_tokens_per_s"]
    return rows


def table(rows: list[dict]) -> str:
    head = ("| config | wall s | tokens/s | peak RSS MiB | × TRL speed | × TRL RSS | × bare speed | wall / bare "
            "| mean loss | cache s | process s | process max RSS MiB | × TRL-gc process RSS | × TRL-gc process speed "
            "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    lines = [head]
    for r in rows:
        wall_vs_bare = 1 / r["vs_bare_speed"] if r.get("vs_bare_speed") else None
        lines.append(
            f"| {r['config']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {fmt(r.get('vs_trl_speed'), '.2f')} | {fmt(r.get('vs_trl_rss'), '.2f')} "
            f"| {fmt(r.get('vs_bare_speed'), '.2f')} | {fmt(wall_vs_bare, '.2f')} "
            f"| {fmt(r['mean_train_loss'], '.5f')} | {fmt(r['cache_s'], '.1f')} "
            f"| {fmt(r.get('process_s'), '.1f')} | {fmt(r.get('process_max_rss_mib'), '.0f')} "
            f"| {fmt(r.get('vs_trl_gc_process_rss'), '.2f')} | {fmt(r.get('vs_trl_gc_process_speed'), '.2f')} |"
        )
    return "\n".join(lines)


def loss_check(rows: list[dict], tolerance: float = 1e-3) -> list[str]:
    """DPO configs of ours must reproduce TRL's mean training loss (same math, same batches)."""
    by_name = {r["config"]: r for r in rows}
    if "trl-sigmoid" not in by_name:
        return []
    trl = by_name["trl-sigmoid"]["mean_train_loss"]
    return [f"{n}: mean loss {by_name[n]['mean_train_loss']} vs TRL {trl}" for n in by_name
            if n.startswith("ours-dpo") and abs(by_name[n]["mean_train_loss"] - trl) > tolerance]  # fmt: skip


def machine() -> str:
    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "transformers", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "absent"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; " + ", ".join(
        f"{k} {v}" for k, v in versions.items()
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", type=Path, default=ROOT / "runs" / "bench" / "workload")
    p.add_argument("--scratch", type=Path, default=ROOT / "runs" / "bench" / "scratch")
    p.add_argument("--only", default="", help=f"comma-separated subset of {ORDER}")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    p.add_argument("--check", action="store_true", help="exit 1 when our DPO loss differs from TRL's")
    p.add_argument("--ours", help=argparse.SUPPRESS)  # internal: run one of ours in this process
    p.add_argument("--trl-lora", action="store_true", help=argparse.SUPPRESS)  # internal: the TRL LoRA anchor
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_lora:
        run_trl_lora(args.workload, args.out_dir)
        return
    if args.ours:
        print(json.dumps(run_ours(args.ours, args.workload, args.scratch / args.ours)))
        return
    names = [n for n in args.only.split(",") if n] or ORDER
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {ORDER}")
    prepare_workload(args.workload)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(args.repeat):
        for name in names:
            result = run_config(name, args.workload, args.scratch)
            results[name].append(result)
            print(f"[{k + 1}/{args.repeat}] {name}: {json.dumps(result)}", flush=True)
    rows = summarize(results)
    text = table(rows)
    print(text)
    mismatches = loss_check(rows)
    for line in mismatches:
        print("LOSS MISMATCH", line)
    if args.write:
        command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M")
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(f"\n### {stamp}: `{command}`\n\n{machine()}. Median of {args.repeat} run(s).\n\n{text}\n")
    if args.check and mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
