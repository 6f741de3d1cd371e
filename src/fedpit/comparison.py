"""`comparison.md` and plots across run directories: paired differences of every method against a
reference method with 95% bootstrap CIs (the verdict), then one row per method (or swept value)
with utility as mean ± std over seeds, leakage where measured, and cost per round."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpit.paired import METRICS, SetComparison, compare_to_reference, verdict_words  # noqa: E402
from fedpit.report import dp_summary, eval_rows, final_rows, privacy_rows, round_rows  # noqa: E402
from fedpit.runs import RunDir, atomic_write_text  # noqa: E402

LEAK_COLUMNS = ("memorization_rougeL", "extraction_exact_rate", "mia_ref_auc", "canary_exposure_extrapolated")


def summarise_run(path: Path) -> dict[str, Any]:
    """Final-round figures of one run."""
    run = RunDir(path)
    records = run.metrics()
    summary: dict[str, Any] = {"path": str(path)}
    for name, rows in eval_rows(records).items():
        for metric in ("rougeL", "nll", "accuracy"):
            if metric in rows[-1]:
                summary[f"{name}/{metric}"] = rows[-1][metric]
        summary.setdefault("_curves", {})[name] = [(r["round"], r.get("nll"), r.get("rougeL")) for r in rows]
    for row in final_rows(records):  # the whole-set evaluation, where it ran, is the verdict
        if row["model"] == "global":
            for metric in ("rougeL", "nll", "accuracy"):
                if metric in row:
                    summary[f"{row['set']}/{metric}"] = row[metric]
    leakage = [r for r in privacy_rows(records) if r["source"] == "run"]
    if leakage:
        last = max(r["round"] for r in leakage)
        for row in (r for r in leakage if r["round"] == last):
            for key in LEAK_COLUMNS:
                summary[f"{row['target']}/{key}"] = row[key]
    dp = dp_summary(records, run.config())
    for level in ("record", "client"):
        if level in dp:
            summary[f"dp_{level}_epsilon"] = dp[level]["epsilon"]
            summary.setdefault("_covers", []).append(f"{level}-level: {dp[level]['covers']}")
    rounds = round_rows(records)
    if rounds:
        summary["seconds_per_round"] = statistics.fmean(r["seconds"] for r in rounds)
        summary["upload_mb_per_round"] = statistics.fmean(r["upload_mb"] for r in rounds)
    return summary


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_comparison(root: Path, groups: dict[str, list[Path]], title: str, filename: str = "comparison.md",
                     x_values: dict[str, float] | None = None, reference: str | None = None) -> Path:
    """`groups` maps a row label (method or swept value) to its runs (one per seed, in the same seed
    order for every label); `reference` is the row every other is paired with."""
    summaries = {label: [summarise_run(p) for p in paths] for label, paths in groups.items()}
    columns = sorted({k for runs in summaries.values() for s in runs for k in s if not k.startswith(("_", "path"))},
                     key=lambda k: (k.count("/") == 0, k))
    lines = [f"# {title}", ""]
    plots: list[str] = []
    if reference is not None and len(groups) > 1:
        comparisons = compare_to_reference(groups, reference)
        lines += difference_section(comparisons, reference, max(len(v) for v in groups.values()))
        plots += _difference_plots(root, comparisons, reference)
    lines += ["## All figures", "", f"{len(groups)} rows, {max(len(v) for v in groups.values())} seed(s) each; "
              "utility is the final global model (the whole-set evaluation where it ran, else the last round), "
              "mean ± std over seeds.", "",
              "| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, runs in summaries.items():
        lines.append(f"| {label} | " + " | ".join(_cell([s.get(c) for s in runs]) for c in columns) + " |")
    lines.append("")
    covers = {label: runs[0]["_covers"] for label, runs in summaries.items() if runs and runs[0].get("_covers")}
    if covers:
        lines += ["What each row's differential privacy covers (epsilon: the largest over clients, per seed):", ""]
        lines += [f"- **{label}**: " + "; ".join(texts) for label, texts in covers.items()] + [""]
    plots += _curves(root, summaries)
    if x_values:
        plots += _against(root, summaries, x_values)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Runs: " + ", ".join(f"[{label}]({Path(p).relative_to(root)}/report.md)"
                                    for label, paths in groups.items() for p in paths), ""]
    out = root / filename
    atomic_write_text(out, "\n".join(lines))
    return out


def difference_section(comparisons: list[SetComparison], reference: str, seeds: int) -> list[str]:
    resampled = "resampling seeds and examples" if seeds > 1 else "resampling examples"
    lines = [f"## Against {reference}: paired differences with 95% CIs", "",
             f"Each Δ is the mean over seeds and examples of (row − {reference}) on the same held-out examples, with "
             f"its 95% bootstrap confidence interval [low, high] ({resampled}; {seeds} seed(s)). **Bold**: the "
             "interval excludes 0, the difference is significant; otherwise it is not (n.s.). NLL: lower is "
             "better; ROUGE-L, accuracy and judge Win+Tie: higher is better.", ""]
    for comparison in comparisons:
        metrics = [m for m in METRICS if any(m in d for d in comparison.differences.values())]
        if not metrics and not comparison.judged:
            continue
        lines += [f"### {comparison.name} ({comparison.examples} examples)", "",
                  "| row | " + " | ".join(f"{METRICS[m][0]} | Δ {METRICS[m][0]}" for m in metrics) + " | verdict |",
                  "|---|" + "---|---|" * len(metrics) + "---|"]
        for label, means in comparison.means.items():
            diffs = comparison.differences.get(label, {})
            cells = [f"{means[m]:.3f}" if m in means else "–" for m in metrics]
            deltas = [diffs[m].describe() if m in diffs else ("reference" if label == reference else "–")
                      for m in metrics]
            row = " | ".join(f"{c} | {d}" for c, d in zip(cells, deltas))
            lines.append(f"| {label} | {row} | {verdict_words(diffs) if diffs else ''} |")
        lines.append("")
        if comparison.judged:
            lines += [f"Judge against the reference answers of {comparison.name} (both orders, all seeds): "
                      + "; ".join(f"{label} {c['win']} win / {c['tie']} tie / {c['lose']} lose / {c['invalid']} "
                                  f"invalid" for label, c in comparison.judged.items()), ""]
        if comparison.head_to_head:
            lines += [f"Judge, head to head against {reference} on {comparison.name} (both orders; Win+Tie and "
                      "win − lose with 95% CIs):", "",
                      "| row | win | tie | lose | invalid | Win+Tie | win − lose |", "|---|---|---|---|---|---|---|"]
            for label, head in comparison.head_to_head.items():
                lines.append(f"| {label} | {head['win']} | {head['tie']} | {head['lose']} | {head['invalid']} | "
                             f"{head['win_tie'].describe()} | {head['net'].describe()} |")
            lines.append("")
    return lines


def _difference_plots(root: Path, comparisons: list[SetComparison], reference: str) -> list[str]:
    """Per set, one panel per metric: each row's difference to the reference with its 95% CI."""
    files = []
    for comparison in comparisons:
        metrics = [m for m in METRICS if any(m in d for d in comparison.differences.values())]
        if not metrics:
            continue
        labels = list(comparison.differences)
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(labels) + 1.6),
                                 squeeze=False, sharey=True)
        for ax, metric in zip(axes[0], metrics):
            ys, means, errors, colours = [], [], [[], []], []
            for y, label in enumerate(labels):
                diff = comparison.differences[label].get(metric)
                if diff is None:
                    continue
                ys.append(y)
                means.append(diff.mean)
                errors[0].append(diff.mean - diff.low)
                errors[1].append(diff.high - diff.mean)
                colours.append("tab:red" if diff.significant else "tab:gray")
            for y, mean, low, high, colour in zip(ys, means, errors[0], errors[1], colours):
                ax.errorbar([mean], [y], xerr=[[low], [high]], fmt="o", color=colour, capsize=3)
            ax.axvline(0.0, color="black", linewidth=0.8)
            ax.set_title(f"Δ {METRICS[metric][0]}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0, 0].set_yticks(range(len(labels)), labels)
        fig.suptitle(f"{comparison.name}: difference to {reference}, 95% CI (red: significant)", fontsize=9)
        fig.tight_layout()
        file = f"differences_{comparison.name}.png"
        fig.savefig(root / file, dpi=110)
        plt.close(fig)
        files.append(file)
    return files


def _curves(root: Path, summaries: dict[str, list[dict[str, Any]]]) -> list[str]:
    files = []
    sets = sorted({name for runs in summaries.values() for s in runs for name in s.get("_curves", {})})
    for name in sets:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for label, runs in summaries.items():
            curve: dict[int, list[float]] = defaultdict(list)
            for s in runs:
                for round_num, nll, _rouge in s.get("_curves", {}).get(name, []):
                    curve[round_num].append(nll)
            if curve:
                xs = sorted(curve)
                ax.plot(xs, [statistics.fmean(curve[x]) for x in xs], marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{name} reference NLL")
        ax.set_title(f"utility per round: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        file = f"utility_{name}.png"
        fig.savefig(root / file, dpi=110)
        plt.close(fig)
        files.append(file)
    leak_key = "global/memorization_rougeL"
    points = []
    for label, runs in summaries.items():
        nll_key = next((c for c in runs[0] if c.endswith("/nll")), None)
        if nll_key and all(s.get(leak_key) is not None for s in runs):
            points.append((label, _mean_of(runs, leak_key), _mean_of(runs, nll_key)))
    if points:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for label, x, y in points:
            ax.scatter([x], [y])
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("leakage: memorisation ROUGE-L of the global model")
        ax.set_ylabel("reference NLL (lower is better)")
        ax.set_title("utility vs leakage")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / "utility_vs_leakage.png", dpi=110)
        plt.close(fig)
        files.append("utility_vs_leakage.png")
    return files


def _against(root: Path, summaries: dict[str, list[dict[str, Any]]], x_values: dict[str, float]) -> list[str]:
    """Leakage and utility against a swept parameter (e.g. beta)."""
    keys = sorted({k for runs in summaries.values() for s in runs for k in s
                   if k.endswith(("/nll", "/memorization_rougeL", "/mia_ref_auc", "/canary_exposure_extrapolated"))})
    if not keys:
        return []
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 2.4 * len(keys)), sharex=True, squeeze=False)
    order = sorted(summaries, key=lambda label: x_values[label])
    for ax, key in zip(axes[:, 0], keys):
        ys = [_mean_of(summaries[label], key) for label in order]
        ax.plot([x_values[label] for label in order], ys, marker="o")
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("swept value")
    fig.tight_layout()
    fig.savefig(root / "sweep.png", dpi=110)
    plt.close(fig)
    return ["sweep.png"]


def _mean_of(runs: list[dict[str, Any]], key: str) -> float:
    values = [s[key] for s in runs if s.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")
