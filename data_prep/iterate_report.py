"""The report of an iterative run: one row per round, and the held-out reward by round as a PNG.

    python -m data_prep.iterate_report runs/iterate                       # → runs/iterate/report.md + .png
    python -m data_prep.iterate_report runs/demo/seed-*/iterate --out runs/demo   # several seeds: mean ± sd

Reads output.dir/round-*/summary.json (written by data_prep.iterate when a round finishes). Columns:
held-out reward (greedy; sampled when eval.samples > 0) with its 95 % bootstrap interval over prompts,
pairs selected, the candidates' reward spread (overall sd and the mean within-prompt range — RSO needs a
spread to choose from), and mean answer length in tokens (greedy answers; candidates) — the first thing to
check for length exploitation. Training: mean chosen / rejected response lengths over the round's steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# ----------------------------------------------------------------------------- a round's numbers


def candidate_stats(rows: list[dict], tokenizer_dir: Path) -> dict:
    """Reward spread of the candidates: overall mean and sd, and the mean within-prompt range and sd."""
    rewards = [x for r in rows for x in r["rewards"]]
    ranges = [max(r["rewards"]) - min(r["rewards"]) for r in rows if r["rewards"]]
    sds = [statistics.pstdev(r["rewards"]) for r in rows if r["rewards"]]
    return {"reward_mean": statistics.fmean(rewards), "reward_sd": statistics.pstdev(rewards),
            "within_prompt_range": statistics.fmean(ranges), "within_prompt_sd": statistics.fmean(sds),
            "mean_tokens": mean_tokens([c for r in rows for c in r["candidates"]], tokenizer_dir)}  # fmt: skip


def eval_stats(folder: Path, model: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("*.json")):
        res = json.loads(path.read_text())
        texts = [t for a in res["answers"] for t in a["answers"]]
        out[path.stem] = {"mean_reward": res["mean_reward"], "ci95": res["ci95"], "solve_rate": res["solve_rate"],
                          "prompts": res["prompts"], "mean_tokens": mean_tokens(texts, model)}  # fmt: skip
    return out


def train_stats(metrics: Path) -> dict:
    from rainbowpo.metrics import read_metrics

    rows = [r for r in read_metrics(str(metrics)) if "loss" in r] if metrics.exists() else []
    if not rows:
        return {}
    keys = ("loss", "rewards/accuracies", "lengths/chosen", "lengths/rejected")
    return {"steps": len(rows), **{f"last/{k}": rows[-1][k] for k in keys if k in rows[-1]},
            **{f"mean/{k}": sum(r[k] for r in rows) / len(rows) for k in keys[2:] if k in rows[0]}}  # fmt: skip


def mean_tokens(texts: list[str], tokenizer_dir: Path) -> float:
    """Mean answer length in the policy's tokens (EOS not counted)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not texts:
        return 0.0
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)


# ----------------------------------------------------------------------------- the report


def read_rounds(run: Path) -> list[dict]:
    rounds = [json.loads(p.read_text()) for p in run.glob("round-*/summary.json")]
    return sorted(rounds, key=lambda s: s["round"])


def _reward(s: dict, mode: str) -> str:
    e = s.get("eval", {}).get(mode)
    return f"{e['mean_reward']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]" if e else "–"


def run_table(rounds: list[dict]) -> list[str]:
    lines = ["| round | policy | greedy reward [95% CI] | sampled reward [95% CI] | solved (greedy) | pairs | "
             "candidate reward sd / within-prompt range | answer tokens (greedy / candidates) | "
             "train lengths chosen / rejected |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in rounds:
        c, t, g = s.get("candidates"), s.get("train", {}), s.get("eval", {}).get("greedy", {})
        spread = f"{c['reward_sd']:.3f} / {c['within_prompt_range']:.3f}" if c else "–"
        tokens = (
            f"{g.get('mean_tokens', 0):.2f} / {c['mean_tokens']:.2f}"
            if c
            else f"{g.get('mean_tokens', 0):.2f} / –"
        )
        lengths = (f"{t['mean/lengths/chosen']:.2f} / {t['mean/lengths/rejected']:.2f}"
                   if "mean/lengths/chosen" in t else "–")  # fmt: skip
        solved = f"{g['solve_rate']:.1%}" if g else "–"
        lines.append(f"| {s['round']} | `{s['policy_fingerprint']}` | {_reward(s, 'greedy')} | {_reward(s, 'sampled')} "
                     f"| {solved} | {s.get('pairs', '–')} | {spread} | {tokens} | {lengths} |")  # fmt: skip
    return lines


def seeds_table(runs: dict[str, list[dict]]) -> list[str]:
    """Mean ± sd over runs (seeds) of each round's held-out rewards."""
    n_rounds = min(len(r) for r in runs.values())
    lines = [f"Mean ± sd over {len(runs)} runs:", "",
             "| round | greedy reward | sampled reward | pairs | answer tokens (greedy) |", "|---|---|---|---|---|"]  # fmt: skip
    for i in range(n_rounds):
        rows = [r[i] for r in runs.values()]
        cells = []
        for get, digits in ((lambda s: s["eval"].get("greedy", {}).get("mean_reward"), 3),
                            (lambda s: s["eval"].get("sampled", {}).get("mean_reward"), 3),
                            (lambda s: s.get("pairs"), 1),
                            (lambda s: s["eval"].get("greedy", {}).get("mean_tokens"), 2)):  # fmt: skip
            vals = [v for v in map(get, rows) if v is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}" if vals else "–")
        lines.append(f"| {rows[0]['round']} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, rounds) in enumerate(runs.items()):
        for mode, style in (("greedy", "-o"), ("sampled", "--s")):
            pts = [(s["round"], s["eval"][mode]) for s in rounds if mode in s.get("eval", {})]
            if not pts:
                continue
            x = [p[0] + 0.03 * i for p in pts]
            y = [p[1]["mean_reward"] for p in pts]
            err = [
                [v - p[1]["ci95"][0] for v, p in zip(y, pts)],
                [p[1]["ci95"][1] - v for v, p in zip(y, pts)],
            ]
            ax.errorbar(x, y, yerr=err, fmt=style, color=f"C{i}", capsize=3, label=f"{name} {mode}")
    ax.set_xlabel("round (0 = initial SFT model)")
    ax.set_ylabel("held-out mean reward (95% CI)")
    ax.set_title("Iterative RainbowPO: held-out reward by round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def short_name(run: Path) -> str:
    """seed-0 for runs/demo/seed-0/iterate, else the folder's name."""
    run = run.resolve()
    return run.parent.name if run.name == "iterate" else run.name


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """report.md and reward_by_round.png in `out` (default: the one run's folder)."""
    out = Path(out or run_dirs[0])
    runs = {short_name(Path(d)): read_rounds(Path(d)) for d in run_dirs}
    runs = {k: v for k, v in runs.items() if v}
    lines = ["# Iterative RainbowPO report", ""]
    if len(runs) > 1:
        lines += seeds_table(runs) + [""]
    for name, rounds in runs.items():
        lines += [f"## {name}", "", *run_table(rounds), ""]
    lines += ["Row r: held-out rewards and greedy answer lengths of policy r (round 0: the initial model); pairs, "
              "candidate spread and candidate lengths of round r's data, sampled from policy r−1; train lengths: "
              "mean chosen / rejected response tokens over round r's steps.", "",
              "![reward by round](reward_by_round.png)", ""]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines))
    if runs:
        plot(runs, out / "reward_by_round.png")
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="output.dir of one or more iterate runs")
    p.add_argument(
        "--out", default=None, help="where report.md and reward_by_round.png go (default: the first run)"
    )
    args = p.parse_args(argv)
    print(f"report: {write_report([Path(r) for r in args.runs], args.out and Path(args.out))}")


if __name__ == "__main__":
    main()
