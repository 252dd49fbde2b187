"""The main job end to end on an embedded tiny model. Run it through `bash launch/demo.sh`:

    bash launch/demo.sh                      # SFT → RSO data prep → RainbowPO (2 ranks, ZeRO-3) → report
    bash launch/demo.sh --compare dpo,simpo  # also DPO and SimPO on the same pairs
    bash launch/demo.sh --lora               # also the RainbowPO stage with a LoRA adapter (rainbowpo_lora)
    bash launch/demo.sh --seeds 3            # seeds 0, 1, 2: mean ± sd in the report
    bash launch/demo.sh --fresh              # recompute every stage
    bash launch/demo.sh --rounds 2 --seeds 3 # iterative RainbowPO: 2 rounds of sample → RSO → train per seed

Stages, per seed, under runs/demo/seed-S/:
  1. data      sort-task prompts (SFT / prep / held-out splits), imperfect demonstrations, a sentencepiece
               tokenizer trained on the fly, a random tiny Llama
  2. sft       `deepspeed --num_accelerators 2 --module rainbowpo.train configs/demo/sft.yaml ...`
  3. prep      `python -m data_prep.pipeline ... --method rso` (N candidates, reward function, RSO pairs)
  4. <method>  `deepspeed ... rainbowpo.train configs/demo/<method>.yaml ...` (ZeRO-3, reference online
               with CPU offload; reference-free for simpo)
  5. eval      `python -m data_prep.evaluate` on held-out prompts: greedy and sampled (T=1, 4 answers)
then runs/demo/report.md and PNG plots (launch/demo_report.py). With --rounds R, stages 3–5 are instead R rounds
of `python -m data_prep.iterate` (configs/iterate/demo.yaml; round r samples from policy r−1) under
seed-S/iterate/, and the report is runs/demo/iterate/report.md (data_prep/iterate_report.py). Each stage runs the project's real entry
point in a subprocess and leaves a stamp holding its command: a re-run skips stages whose command is
unchanged, unless --fresh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REWARD = "data_prep.tasks.sort_task:reward"
TASK = {"min_len": 4, "max_len": 4, "distinct": True}  # sort four different digits
STAMP = ".demo_stage.json"


@dataclass(frozen=True)
class Sizes:
    """How big the demo is; `quick` is the reduced size of the e2e test."""

    sft_rows: int = 3000
    prep_prompts: int = 512
    heldout_prompts: int = 200
    candidates: int = 8
    hidden: int = 128
    layers: int = 4
    sft_epochs: int = 6
    po_epochs: int = 2
    eval_samples: int = 4


SIZES = {
    "full": Sizes(),
    "quick": Sizes(prep_prompts=384, heldout_prompts=100),  # the SFT stage as in full: it needs the steps
}


class Stages:
    """Runs the stages of one seed in order. A stage is skipped when its folder holds a stamp of the same
    command and no earlier stage ran in this invocation (a changed input reruns everything after it)."""

    def __init__(self, work: Path, fresh: bool):
        self.work, self.rerun = work, fresh

    def done(self, folder: Path, cmd: list) -> bool:
        stamp = folder / STAMP
        if not self.rerun and stamp.exists() and json.loads(stamp.read_text()) == cmd:
            print(f"[demo] {folder.name}: done earlier, reusing {folder} (--fresh to recompute)")
            return True
        self.rerun = True
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return False

    def run(self, folder: Path, cmd: list[str]) -> None:
        """Run cmd (an argument list, never a shell string); `{port}` becomes a free port."""
        if self.done(folder, cmd):
            return
        log = self.work / f"{folder.name}.log"
        print(f"[demo] {folder.name}: {' '.join(cmd)}\n[demo]   log: {log}", flush=True)
        argv = [c.replace("{port}", str(free_port())) for c in cmd]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            relay(proc.stdout, out)
        if proc.wait() != 0:
            sys.exit(f"[demo] {folder.name} failed (exit {proc.returncode}); the end of {log}:\n{_tail(log)}")
        self.stamp(folder, cmd)

    def stamp(self, folder: Path, cmd: list) -> None:
        (folder / STAMP).write_text(json.dumps(cmd))


def relay(stream, log) -> None:
    """Copy a child's output to its log; echo the key lines, and its progress bars in place on a terminal."""
    pending, bar_open, tty = b"", False, sys.stdout.isatty()
    while chunk := stream.read1(65536):
        log.write(chunk)
        *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
        for piece in pieces:
            text = piece.decode(errors="replace").rstrip()
            if tty and PROGRESS.search(text):
                sys.stdout.write("\r    " + text[-150:].ljust(150))
                bar_open = True
            elif text.lstrip().startswith(SHOWN):
                print(("\n" if bar_open else "") + "    " + text[-160:])
                bar_open = False
            sys.stdout.flush()
    if bar_open:
        print()


PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
SHOWN = (
    "data: ",
    "world size",
    "setup: ",
    "exported",
    "data prep summary",
    "generate: ",
    "select [",
    "Error",
    "config error",
    "[iterate]",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def make_data(folder: Path, seed: int, sizes: Sizes) -> None:
    """Prompts for SFT, data prep and evaluation (no prompt in two splits), imperfect SFT demonstrations,
    a sentencepiece tokenizer and a random tiny Llama."""
    from data_prep.tasks import sort_task
    from rainbowpo.tiny import build_tiny_model, train_sentencepiece

    base = 1000 * seed
    sft = sort_task.make_prompts(sizes.sft_rows, seed=base + 1, **TASK)
    seen = {r["prompt"] for r in sft}
    splits = {}
    for offset, (name, n) in enumerate((("prep", sizes.prep_prompts), ("heldout", sizes.heldout_prompts)), 2):
        unseen = [
            r for r in sort_task.make_prompts(4 * n, seed=base + offset, **TASK) if r["prompt"] not in seen
        ]
        splits[name] = list({r["prompt"]: r for r in unseen}.values())[:n]  # disjoint from earlier splits
        seen.update(r["prompt"] for r in splits[name])
    rng = random.Random(seed)
    demos = [{"prompt": r["prompt"], "completion": sort_task.imperfect_demo(r, rng, drop=False)} for r in sft]
    _write_jsonl(folder / "sft.jsonl", demos)
    for name, rows in splits.items():
        _write_jsonl(folder / f"{name}.jsonl", rows)
    texts = [r["prompt"] + " " + sort_task.solve(r) for r in sft]
    tok = train_sentencepiece(texts, str(folder / "tokenizer"), vocab_size=64)
    build_tiny_model(tok, str(folder / "base"), hidden=sizes.hidden, layers=sizes.layers, heads=4, kv_heads=2,
                     seed=seed)  # fmt: skip
    right = sum(d["completion"] == sort_task.solve(r) for d, r in zip(demos, sft))
    print(f"[demo] data: {len(demos)} SFT demos ({right / len(demos):.0%} correct), "
          f"{len(splits['prep'])} prep prompts, {len(splits['heldout'])} held-out prompts")  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def train_cmd(config: str, overrides: dict) -> list[str]:
    """The launch a user types: `deepspeed --num_accelerators 2 --module rainbowpo.train CONFIG k=v ...`."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_accelerators", "2", "--master_port", "{port}", "--module", "rainbowpo.train",
            config, *(f"{k}={v}" for k, v in overrides.items())]  # fmt: skip


def data_and_sft(seed: int, sizes: Sizes, work: Path, stages: Stages) -> Path:
    """The seed's data (made once) and its SFT model in work/sft (skipped when done); returns the data folder."""
    data, sft = work / "data", work / "sft"
    data_stamp = ["make_data", seed, sizes.sft_rows, sizes.prep_prompts, sizes.heldout_prompts, sizes.hidden,
                  sizes.layers]  # fmt: skip
    if not stages.done(data, data_stamp):
        make_data(data, seed, sizes)
        stages.stamp(data, data_stamp)
    stages.run(sft, train_cmd("configs/demo/sft.yaml", {
        "model.path": data / "base", "data.train": data / "sft.jsonl", "output.dir": sft,
        "train.epochs": sizes.sft_epochs, "train.seed": seed}))  # fmt: skip
    return data


def run_seed(seed: int, methods: list[str], sizes: Sizes, out: Path, fresh: bool) -> None:
    """All stages for one seed under out/seed-S."""
    work, stages = out / f"seed-{seed}", Stages(out / f"seed-{seed}", fresh)
    data, sft, prep = data_and_sft(seed, sizes, work, stages), work / "sft", work / "prep"
    stages.run(prep, [sys.executable, "-m", "data_prep.pipeline", "--model", str(sft / "final"),
                      "--prompts", str(data / "prep.jsonl"), "--out", str(prep), "--procs", "2",
                      "--reward", REWARD, "--method", "rso", "--k", "4", "--beta-rso", "0.5",
                      "--min-gap", "0.2", "--n", str(sizes.candidates), "--temperature", "1.0",
                      "--max-new-tokens", "16", "--seed", str(seed)])  # fmt: skip
    for method in methods:
        stages.run(work / method, train_cmd(f"configs/demo/{method}.yaml", {
            "model.path": sft / "final", "data.train": prep / "pairs.jsonl", "output.dir": work / method,
            "train.epochs": sizes.po_epochs, "train.seed": seed}))  # fmt: skip
    evaluate_all(stages, work, ["sft", *methods], data / "heldout.jsonl", sizes)


def run_iterate(seed: int, rounds: int, sizes: Sizes, out: Path, fresh: bool) -> Path:
    """Data and SFT as above, then `python -m data_prep.iterate` (configs/iterate/demo.yaml, this seed's
    paths); the driver resumes by itself, so a re-run continues or skips its rounds."""
    import yaml

    work, stages = out / f"seed-{seed}", Stages(out / f"seed-{seed}", fresh)
    data, sft = data_and_sft(seed, sizes, work, stages), work / "sft"
    cfg = yaml.safe_load((ROOT / "configs/iterate/demo.yaml").read_text())
    cfg["model"]["path"] = str(sft / "final")
    cfg["prep"].update(prompts=str(data / "prep.jsonl"), seed=seed, n=sizes.candidates)
    cfg["train"]["overrides"].update({"train.seed": seed, "train.epochs": sizes.po_epochs})
    cfg["eval"].update(prompts=str(data / "heldout.jsonl"), samples=sizes.eval_samples)
    cfg["output"]["dir"] = str(work / "iterate")
    if stages.rerun and (work / "iterate").exists():  # SFT (or --fresh) ran again: the old rounds are stale
        shutil.rmtree(work / "iterate")
    config = work / "iterate.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "data_prep.iterate", str(config), "--rounds", str(rounds)]
    print(f"[demo] iterate: {' '.join(cmd)}\n[demo]   log: {work / 'iterate.log'}", flush=True)
    with open(work / "iterate.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        relay(proc.stdout, log)
    if proc.wait() != 0:
        sys.exit(f"[demo] iterate failed (exit {proc.returncode}); the end of {work / 'iterate.log'}:\n"
                 f"{_tail(work / 'iterate.log')}")  # fmt: skip
    return work / "iterate"


def evaluate_all(stages: Stages, work: Path, models: list[str], prompts: Path, sizes: Sizes) -> None:
    """Greedy and sampled evaluation of every model, two processes at a time (one per core)."""
    sampled = ["--temperature", "1.0", "--n", str(sizes.eval_samples)]
    jobs = [[sys.executable, "-m", "data_prep.evaluate", "--model", str(work / name / "final"),
             "--prompts", str(prompts), "--reward", REWARD, "--max-new-tokens", "16",
             "--out", str(work / "eval" / f"{name}_{mode}.json"), *extra]
            for name in models for mode, extra in (("greedy", []), ("sampled", sampled))]  # fmt: skip
    if stages.done(work / "eval", jobs):
        return
    print(f"[demo] eval: greedy and sampled answers of {', '.join(models)} on {len(prompts.read_text().splitlines())}"
          " held-out prompts", flush=True)  # fmt: skip
    for i in range(0, len(jobs), 2):
        procs = [
            subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.DEVNULL) for cmd in jobs[i : i + 2]
        ]
        for cmd, proc in zip(jobs[i : i + 2], procs):
            if proc.wait() != 0:
                sys.exit(f"[demo] evaluation failed: {' '.join(cmd)}")
    stages.stamp(work / "eval", jobs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="first seed (data, model init, sampling)")
    p.add_argument("--seeds", type=int, default=1, help="repeat with K consecutive seeds; report mean ± sd")
    p.add_argument("--compare", default="", help="comma-separated: dpo,simpo (same pairs, same schedule)")
    p.add_argument("--fresh", action="store_true", help="recompute every stage")
    p.add_argument("--lora", action="store_true", help="also RainbowPO with a LoRA adapter (rainbowpo_lora)")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--rounds", type=int, default=0, help="iterative RainbowPO: R rounds per seed (data_prep.iterate)"
    )
    args = p.parse_args(argv)
    compare = [m for m in args.compare.split(",") if m]
    unknown = [m for m in compare if m not in ("dpo", "simpo")]
    if unknown:
        p.error(f"--compare accepts dpo and simpo, got {unknown}")
    methods = ["rainbowpo", *compare, *(["rainbowpo_lora"] if args.lora else [])]
    out = (ROOT / args.out).resolve()
    seeds = list(range(args.seed, args.seed + args.seeds))
    if args.rounds:
        from data_prep.iterate_report import write_report as write_iterate_report

        runs = [run_iterate(seed, args.rounds, SIZES[args.size], out, args.fresh) for seed in seeds]
        print(f"[demo] report: {write_iterate_report(runs, out / 'iterate')}")
        return
    for seed in seeds:
        run_seed(seed, methods, SIZES[args.size], out, args.fresh)
    from demo_report import write_report

    write_report(out, seeds, methods)


if __name__ == "__main__":
    main()
