"""Iterative RainbowPO: sample → score → select → train → evaluate, round after round, in one command.

    bash launch/iterate.sh configs/iterate/demo.yaml --rounds 2
    python -m data_prep.iterate configs/iterate/realistic.yaml --rounds 3 --hostfile hostfile prep.n=16

Round r samples candidates from policy r−1 (round 1: `model.path`, the SFT model), scores them, selects
pairs (RSO, Algorithm 1, by default), trains policy r from policy r−1 with the reference chosen by
`iterate.reference` (initial: the SFT model every round; previous: policy r−1), and evaluates policy r on
held-out prompts (round 0 is the SFT model itself; answers by data_prep.generate, scored by data_prep.score). Everything lands in `output.dir/round-r/`:

    round.json        the round's base model and reference, with their fingerprints
    candidates/       part files of data_prep.generate (each row carries the generating model's fingerprint)
    scored/           data_prep.score;   pairs.jsonl + select.json: data_prep.select and its summary
    train/            a rainbowpo.train run (train/final: policy r);   eval/: greedy.json, sampled.json
    summary.json      the numbers of the report;   <stage>.DONE markers, and DONE for the whole round

Prompts are rendered as training renders them: the training config's data.chat_template_kwargs go to
data_prep.generate (--chat-template-kwargs) and to a reward model's chat template.

Resumable everywhere: a finished stage (its .DONE marker) or round (DONE) is never run again; a killed
stage continues on its own (generate and score skip finished prompts, training resumes from its newest
checkpoint with output.resume=auto). A round's data only ever comes from its base model: resuming checks
the fingerprints and refuses a folder made by another model, and a run folder refuses a changed config.
Report: output.dir/report.md and reward_by_round.png (data_prep.iterate_report).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from data_prep import select as select_stage
from data_prep.iterate_config import (  # noqa: F401  (re-exported: the config is part of this command)
    DRIVER_KEYS,
    ConfigError,
    IterateConfig,
    chat_template_kwargs,
    check_same_run,
    flatten,
    load_iterate_config,
    train_overrides,
    unflatten,
)
from data_prep.iterate_report import candidate_stats, eval_stats, train_stats
from rainbowpo.fingerprint import model_fingerprint

# ----------------------------------------------------------------------------- stages and markers


class Round:
    """One round's folder and its DONE markers."""

    def __init__(self, out: Path, r: int):
        self.r, self.dir = r, out / f"round-{r}"

    def marker(self, stage: str) -> Path:
        """<stage>.DONE per stage; DONE for the whole round."""
        return self.dir / ("DONE" if stage == "round" else f"{stage}.DONE")

    def done(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def mark(self, stage: str, info: dict) -> None:
        write_json(self.marker(stage), {"stage": stage, "finished": time.time(), **info})

    @property
    def policy(self) -> Path:
        return self.dir / "train" / "final"


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def say(text: str) -> None:
    print(f"[iterate] {text}", flush=True)


def run_cmd(cmd: list[str], log: Path) -> None:
    """A stage's subprocess, its output in `log`; a failure ends the run with the log's tail."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "ab") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise StageError(f"{' '.join(cmd[:4])} … failed (exit {code}); the end of {log}:\n{tail}")


def run_parallel(cmds: list[list[str]], logs: list[Path]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "ab") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
    failed = [log for p, log in zip(procs, logs) if p.wait() != 0]
    if failed:
        raise StageError(f"failed: see {', '.join(map(str, failed))}")


class StageError(RuntimeError):
    """A stage's subprocess failed; the message holds the end of its log."""


# ----------------------------------------------------------------------------- one round


def run_round(cfg: IterateConfig, rnd: Round, base: Path, launch: dict) -> Path:
    """Round r: data from `base` (policy r−1), policy r trained from it; returns policy r."""
    if rnd.done("round"):
        say(f"round {rnd.r}: done earlier ({rnd.dir}), skipped")
        return rnd.policy
    rnd.dir.mkdir(parents=True, exist_ok=True)
    base_fp = start_round(cfg, rnd, base)
    prompts = round_prompts(cfg, rnd)
    seed = cfg.prep.seed + rnd.r
    if not rnd.done("generate"):
        generate(cfg, rnd, base, prompts, seed, base_fp)
    check_fingerprints(rnd.dir / "candidates", base_fp, "candidates")
    if not rnd.done("score"):
        score(cfg, rnd)
    if not rnd.done("select"):
        say(f"round {rnd.r}: select ({cfg.prep.method})")
        summary = select_stage.select(str(rnd.dir / "scored"), str(rnd.dir / "pairs.jsonl"), cfg.prep.method,
                                      cfg.prep.k, cfg.prep.beta_rso, cfg.prep.min_gap, seed, cfg.prep.pairing)  # fmt: skip
        write_json(rnd.dir / "select.json", summary)
        if not summary["pairs"]:
            raise StageError(
                f"round {rnd.r}: no pairs selected (all candidates tie?); see {rnd.dir / 'select.json'}"
            )
        rnd.mark("select", {"pairs": summary["pairs"]})
    if not rnd.done("train"):
        train(cfg, rnd, base, launch)
    if not rnd.done("eval"):
        evaluate(cfg, rnd.dir / "eval", rnd.policy, f"round {rnd.r}")
        rnd.mark("eval", {"model_fingerprint": model_fingerprint(str(rnd.policy))})
    finish_round(cfg, rnd, base_fp)
    return rnd.policy


def start_round(cfg: IterateConfig, rnd: Round, base: Path) -> str:
    """round.json names the base model and the reference; a resumed round must find the same base."""
    base_fp = model_fingerprint(str(base))
    reference = Path(cfg.model.path) if cfg.iterate.reference == "initial" else base
    info = {"round": rnd.r, "base_model": str(base), "base_fingerprint": base_fp, "reference": str(reference),
            "reference_fingerprint": model_fingerprint(str(reference)), "reference_choice": cfg.iterate.reference}  # fmt: skip
    path = rnd.dir / "round.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old["base_fingerprint"] != base_fp:
            raise StageError(
                f"{rnd.dir} was started from {old['base_model']} (fingerprint {old['base_fingerprint']}) but policy "
                f"{rnd.r - 1} is now {base} ({base_fp}); delete {rnd.dir} to redo the round from the new policy"
            )
        say(f"round {rnd.r}: resuming in {rnd.dir}")
        return base_fp
    write_json(path, info)
    say(f"round {rnd.r}: base {base} ({base_fp}), reference {cfg.iterate.reference}: {reference}")
    return base_fp


def round_prompts(cfg: IterateConfig, rnd: Round) -> Path:
    """All prompts, or the round's slice of prep.prompts_per_round (written once, then reused)."""
    m = cfg.prep.prompts_per_round
    if not m:
        return Path(cfg.prep.prompts)
    path = rnd.dir / "prompts.jsonl"
    if not path.exists():
        lines = [x for x in Path(cfg.prep.prompts).read_text().splitlines() if x.strip()]
        start = (rnd.r - 1) * m
        ids = [(start + i) % len(lines) for i in range(min(m, len(lines)))]
        rows = [{"id": str(i), **json.loads(lines[i])} for i in ids]  # a row's own id wins
        tmp = path.with_name(".tmp-prompts.jsonl")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    return path


def generate(cfg: IterateConfig, rnd: Round, base: Path, prompts: Path, seed: int, base_fp: str) -> None:
    """`python -m data_prep.generate` as prep.procs shards; part files resume a killed generation."""
    out = rnd.dir / "candidates"
    check_fingerprints(out, base_fp, "candidates")  # never continue another model's samples
    p = cfg.prep
    say(f"round {rnd.r}: generate {p.n} candidates per prompt of {prompts} with {p.procs} process(es)")
    cmd = [sys.executable, "-m", "data_prep.generate", "--model", str(base), "--prompts", str(prompts),
           "--out", str(out), "--n", str(p.n), "--temperature", str(p.temperature), "--top-p", str(p.top_p),
           "--top-k", str(p.top_k), "--max-new-tokens", str(p.max_new_tokens), "--seed", str(seed),
           "--engine", p.engine, "--chunk", str(p.chunk), *template_flags(cfg)]  # fmt: skip
    run_parallel([cmd + ["--shard", f"{i}/{p.procs}"] for i in range(p.procs)],
                 [rnd.dir / f"generate-{i}.log" for i in range(p.procs)])  # fmt: skip
    rnd.mark("generate", {"model": str(base), "model_fingerprint": base_fp})


def template_flags(cfg: IterateConfig) -> list[str]:
    """data_prep.generate's --chat-template-kwargs: the training config's data.chat_template_kwargs."""
    kwargs = chat_template_kwargs(cfg)
    return ["--chat-template-kwargs", json.dumps(kwargs)] if kwargs else []


def check_fingerprints(folder: Path, expected: str, what: str) -> None:
    from data_prep.common import read_parts

    made_by = {r.get("model_fingerprint") for r in read_parts(str(folder))}
    if made_by - {expected}:
        raise StageError(f"{folder}: {what} made by model(s) {sorted(map(str, made_by - {expected}))}, not by this "
                         f"round's base ({expected}); delete {folder} to sample it again")  # fmt: skip


def score(cfg: IterateConfig, rnd: Round) -> None:
    from data_prep import score as score_stage

    say(f"round {rnd.r}: score with {cfg.prep.reward or cfg.prep.reward_model}")
    scorer = score_stage.make_scorer(cfg.prep.reward or None, cfg.prep.reward_model or None,
                                     chat_template_kwargs=chat_template_kwargs(cfg))  # fmt: skip
    score_stage.score(str(rnd.dir / "candidates"), str(rnd.dir / "scored"), scorer)
    rnd.mark("score", {"scorer": scorer.name})


def train(cfg: IterateConfig, rnd: Round, base: Path, launch: dict) -> None:
    """`deepspeed … --module rainbowpo.train CONFIG overrides`; resumes from its checkpoints if killed."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    where = ["--hostfile", launch["hostfile"]] if launch["hostfile"] else []
    if launch["num_accelerators"] and not launch["hostfile"]:
        where = ["--num_accelerators", str(launch["num_accelerators"])]
    cmd = [deepspeed, *where, "--master_port", str(free_port()), *cfg.train.launcher_args, "--module",
           "rainbowpo.train", cfg.train.config,
           *train_overrides(cfg, str(base), str(rnd.dir / "pairs.jsonl"), str(rnd.dir / "train"))]  # fmt: skip
    say(f"round {rnd.r}: train policy {rnd.r} from {base} (log {rnd.dir / 'train.log'})")
    run_cmd(cmd, rnd.dir / "train.log")
    if not (rnd.policy / "config.json").exists():
        raise StageError(f"round {rnd.r}: training ended without {rnd.policy}; output.export must stay true")
    rnd.mark("train", {"base_fingerprint": model_fingerprint(str(base)),
                       "model_fingerprint": model_fingerprint(str(rnd.policy))})  # fmt: skip


def evaluate(cfg: IterateConfig, out: Path, model: Path, label: str) -> None:
    """Greedy and (eval.samples > 0) sampled answers to the held-out prompts, made by data_prep.generate and
    scored by data_prep.score (so a reward model and vLLM work here too); per prompt the mean reward of its
    answers, then the mean over prompts with a 95 % bootstrap interval (data_prep.evaluate.bootstrap_ci)."""
    from data_prep import score as score_stage
    from data_prep.common import read_parts
    from data_prep.evaluate import bootstrap_ci

    e = cfg.eval
    out.mkdir(parents=True, exist_ok=True)
    modes = {"greedy": (1, 0.0)} | ({"sampled": (e.samples, e.temperature)} if e.samples else {})
    say(f"{label}: evaluate {model} on {e.prompts} ({', '.join(modes)})")
    reward_model = None if e.reward else cfg.prep.reward_model or None
    reward = e.reward or cfg.prep.reward or None
    scorer = score_stage.make_scorer(reward, reward_model, chat_template_kwargs=chat_template_kwargs(cfg))
    cmds, logs, procs = [], [], cfg.prep.procs
    for mode, (n, temperature) in modes.items():  # all modes' generations at once: one start-up wait
        cmd = [sys.executable, "-m", "data_prep.generate", "--model", str(model), "--prompts", e.prompts,
               "--out", str(out / f"{mode}-answers"), "--n", str(n), "--temperature", str(temperature),
               "--max-new-tokens", str(e.max_new_tokens), "--seed", str(e.seed), "--engine", cfg.prep.engine,
               "--chunk", str(cfg.prep.chunk), *template_flags(cfg)]  # fmt: skip
        cmds += [cmd + ["--shard", f"{i}/{procs}"] for i in range(procs)]
        logs += [out / f"{mode}-{i}.log" for i in range(procs)]
    run_parallel(cmds, logs)
    for mode, (n, temperature) in modes.items():
        scored = out / f"{mode}-scored"
        score_stage.score(str(out / f"{mode}-answers"), str(scored), scorer)
        rows = sorted(read_parts(str(scored)), key=lambda r: r["id"])
        per_prompt = [statistics.fmean(r["rewards"][:n]) for r in rows]
        write_json(out / f"{mode}.json", {
            "model": str(model), "prompts": len(rows), "mean_reward": statistics.fmean(per_prompt),
            "ci95": list(bootstrap_ci(per_prompt)), "temperature": temperature, "samples_per_prompt": n,
            "solve_rate": statistics.fmean(statistics.fmean(x == 1.0 for x in r["rewards"][:n]) for r in rows),
            "scorer": scorer.name, "rewards": per_prompt,
            "answers": [{"id": r["id"], "answers": r["candidates"][:n], "rewards": r["rewards"][:n]} for r in rows],
        })  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- round summaries


def finish_round(cfg: IterateConfig, rnd: Round, base_fp: str) -> None:
    """summary.json (what the report shows), then the round's DONE marker."""
    from data_prep.common import read_jsonl, read_parts

    policy_fp = model_fingerprint(str(rnd.policy))
    pairs = read_jsonl(str(rnd.dir / "pairs.jsonl"))
    made_by = {p.get("provenance", {}).get("model_fingerprint") for p in pairs}
    if made_by != {base_fp}:
        raise StageError(
            f"{rnd.dir / 'pairs.jsonl'}: pairs from models {sorted(map(str, made_by))}, expected {base_fp}"
        )
    scored = read_parts(str(rnd.dir / "scored"))
    summary = {
        "round": rnd.r,
        "base_fingerprint": base_fp,
        "policy": str(rnd.policy),
        "policy_fingerprint": policy_fp,
        "reference": cfg.iterate.reference,
        "pairs": len(pairs),
        "prompts_sampled": len(scored),
        "candidates": candidate_stats(scored, rnd.policy),
        "eval": eval_stats(rnd.dir / "eval", rnd.policy),
        "train": train_stats(rnd.dir / "train" / "metrics.jsonl"),
    }
    write_json(rnd.dir / "summary.json", summary)
    rnd.mark("round", {"base_fingerprint": base_fp, "policy_fingerprint": policy_fp})
    say(f"round {rnd.r}: done; policy {rnd.r} = {rnd.policy} ({policy_fp}); {len(pairs)} pairs; "
        + ", ".join(f"{m} reward {v['mean_reward']:.3f}" for m, v in summary["eval"].items()))  # fmt: skip


def round_zero(cfg: IterateConfig, out: Path) -> None:
    """Round 0: the SFT model on the held-out prompts, the row every round is compared with."""
    rnd = Round(out, 0)
    if rnd.done("round"):
        return
    rnd.dir.mkdir(parents=True, exist_ok=True)
    model = Path(cfg.model.path)
    if not rnd.done("eval"):
        evaluate(cfg, rnd.dir / "eval", model, "round 0 (the initial model)")
        rnd.mark("eval", {})
    fp = model_fingerprint(str(model))
    write_json(rnd.dir / "summary.json", {"round": 0, "policy": str(model), "policy_fingerprint": fp,
                                          "eval": eval_stats(rnd.dir / "eval", model)})  # fmt: skip
    rnd.mark("round", {"policy_fingerprint": fp})


# ----------------------------------------------------------------------------- the loop


def hold_run_lock(out: Path):
    """One driver per run folder: an exclusive flock on output.dir/.lock, released by the kernel when this
    process ends in any way (a SIGKILLed run leaves no stale lock). Returns the open file; keep it."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StageError(
            f"{out} is in use by another data_prep.iterate run; wait for it or stop it"
        ) from None
    return handle


def iterate(cfg: IterateConfig, rounds: int, hostfile: str = "") -> list[Path]:
    """Round 0 (evaluate the SFT model), then rounds 1..R; returns the policies. Writes the report."""
    import dataclasses

    from data_prep.iterate_report import write_report

    out = Path(cfg.output.dir)
    lock = hold_run_lock(out)  # noqa: F841  (held until this process ends, however it ends)
    raw = flatten(dataclasses.asdict(cfg))
    check_same_run(cfg, out, raw)
    launch = {"hostfile": hostfile or cfg.train.hostfile, "num_accelerators": cfg.train.num_accelerators}
    round_zero(cfg, out)
    policies = [Path(cfg.model.path)]
    for r in range(1, rounds + 1):
        policies.append(run_round(cfg, Round(out, r), policies[-1], launch))
        write_report([out])
    say(f"report: {out / 'report.md'}")
    return policies


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the iterate YAML, e.g. configs/iterate/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prep.n=16")
    p.add_argument("--rounds", type=int, default=None, help="rounds to run (default: iterate.rounds)")
    p.add_argument("--hostfile", default="", help="deepspeed hostfile for the training stage")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"iterate.rounds={args.rounds}"] if args.rounds is not None else [])
    try:
        cfg = load_iterate_config(args.config, overrides)
        if args.hostfile and not os.path.isfile(args.hostfile):
            raise ConfigError(f"--hostfile {args.hostfile}: not found")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stages keep what they wrote
        iterate(cfg, cfg.iterate.rounds, args.hostfile)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    except (StageError, ValueError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
