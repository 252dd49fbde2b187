"""The demo's report: runs/demo/report.md, curves.png (training curves), rewards.png (held-out rewards).

Headline numbers are per held-out prompt: the mean reward of 4 sampled answers (T = 1, the expected
reward that preference optimization maximizes) and the greedy answer's reward; the gain over SFT carries
a paired bootstrap 95 % confidence interval over prompts.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("sampled", "greedy")
CURVES = (("loss", "loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "accuracy"))


def paired_gain_ci(after: list[float], before: list[float], seed: int = 0, resamples: int = 2000):
    """Mean of after − before over prompts and its percentile bootstrap 95 % interval."""
    diffs = [a - b for a, b in zip(after, before)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.fmean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def load_evals(work: Path, models: list[str]) -> dict:
    return {
        (m, mode): json.loads((work / "eval" / f"{m}_{mode}.json").read_text())
        for m in models
        for mode in MODES
    }


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(work: Path, methods: list[str], target: Path) -> None:
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for method in methods:
        rows = [r for r in read_metrics(work / method / "metrics.jsonl") if "loss" in r]
        steps = [r["step"] for r in rows]
        for ax, (key, title) in zip(axes, CURVES):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=method, linewidth=1.2)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def plot_rewards(evals: dict, models: list[str], target: Path) -> None:
    fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 3.2))
    bins = [i / 10 for i in range(11)]
    for ax, mode in zip(axes, MODES):
        for m in models:
            ax.hist(evals[(m, mode)]["rewards"], bins=bins, histtype="step", linewidth=1.8, label=m)
        ax.set_title(f"held-out reward per prompt ({mode})")
        ax.set_xlabel("reward")
        ax.set_ylabel("prompts")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def seed_table(out: Path, seed: int, methods: list[str]) -> tuple[list[str], dict]:
    """Markdown rows for one seed and {(model, mode): mean reward} for the cross-seed summary."""
    work = out / f"seed-{seed}"
    models = ["sft", *methods]
    evals = load_evals(work, models)
    lines = [
        "| model | mode | mean reward [95% CI] | solved | gain over SFT [paired 95% CI] |",
        "|---|---|---|---|---|",
    ]
    means = {}
    for mode in MODES:
        for m in models:
            e = evals[(m, mode)]
            means[(m, mode)] = e["mean_reward"]
            gain = "—"
            if m != "sft":
                g, lo, hi = paired_gain_ci(e["rewards"], evals[("sft", mode)]["rewards"])
                means[(m, mode, "gain")] = g
                gain = f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            lines.append(f"| {m} | {mode} | {e['mean_reward']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] "
                         f"| {e['solve_rate']:.1%} | {gain} |")  # fmt: skip
    plot_curves(work, methods, out / f"curves_seed{seed}.png")
    plot_rewards(evals, models, out / f"rewards_seed{seed}.png")
    return lines, means


def examples(out: Path, seed: int, methods: list[str], k: int = 5) -> list[str]:
    evals = load_evals(out / f"seed-{seed}", ["sft", *methods])
    sft, best = evals[("sft", "greedy")]["answers"], evals[(methods[0], "greedy")]["answers"]
    lines = [f"| prompt | sft | {methods[0]} |", "|---|---|---|"]
    differ = [(a, b) for a, b in zip(sft, best) if a["answers"][0] != b["answers"][0]]
    for a, b in differ[:k]:
        lines.append(f"| `{a['prompt']}` | `{a['answers'][0]}` ({a['rewards'][0]:.2f}) "
                     f"| `{b['answers'][0]}` ({b['rewards'][0]:.2f}) |")  # fmt: skip
    return lines


def write_report(out: Path, seeds: list[int], methods: list[str]) -> Path:
    """Write out/report.md and the plots; print a short summary with the paths."""
    text = ["# RainbowPO demo report", "", "Task: sort a short list of digits; reward = fraction of positions right "
            "(1.0 = solved). SFT learned from imperfect demonstrations; the preference runs trained on RSO pairs "
            "sampled from the SFT model and scored by the reward function. Held-out prompts were never trained on.",
            ""]  # fmt: skip
    per_seed, tables = {}, {}
    for seed in seeds:
        lines, per_seed[seed] = seed_table(out, seed, methods)
        tables[seed] = lines
        text += [f"## Seed {seed}", "", *lines, "", f"![training curves](curves_seed{seed}.png)", "",
                 f"![held-out rewards](rewards_seed{seed}.png)", ""]  # fmt: skip
    if len(seeds) > 1:
        text += [
            "## Across seeds (mean ± sd)",
            "",
            "| model | mode | mean reward | gain over SFT |",
            "|---|---|---|---|",
        ]
        for mode in MODES:
            for m in ["sft", *methods]:
                vals = [per_seed[s][(m, mode)] for s in seeds]
                gains = [per_seed[s][(m, mode, "gain")] for s in seeds] if m != "sft" else None
                gain = f"{statistics.fmean(gains):+.3f} ± {statistics.stdev(gains):.3f}" if gains else "—"
                text.append(
                    f"| {m} | {mode} | {statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f} | {gain} |"
                )
        text.append("")
    text += [
        f"## Held-out prompts where the greedy answers differ (seed {seeds[0]}, first 5)",
        "",
        *examples(out, seeds[0], methods),
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(text))
    print("\n".join(["", f"held-out results, seed {seeds[0]}:", *tables[seeds[0]]]))
    print(f"report: {report}\nplots:  {out}/curves_seed{seeds[0]}.png  {out}/rewards_seed{seeds[0]}.png")
    return report
