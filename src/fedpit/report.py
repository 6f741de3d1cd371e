"""`report.md` and PNG plots from a run directory's metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpit.runs import RunDir, atomic_write_text  # noqa: E402

UTILITY_METRICS = ("rougeL", "nll", "accuracy")


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(finite) / len(finite) if finite else float("nan")


def round_rows(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One row per round: means over the sampled clients."""
    rows = []
    for rec in (r for r in records if r.get("kind") == "round"):
        clients = list(rec["clients"].values())
        phases: dict[str, list[float]] = defaultdict(list)
        for c in clients:
            for phase, seconds in c.get("seconds", {}).items():
                phases[phase].append(seconds)
        rows.append({
            "round": rec["round"],
            "clients": len(clients),
            "loss_private": _mean([c.get("train_loss_private") for c in clients]),
            "loss_synthetic": _mean([c.get("train_loss_synthetic") for c in clients]),
            "synthetic_generated": _mean([c.get("synthetic_generated") for c in clients]),
            "synthetic_passed": _mean([c.get("synthetic_passed") for c in clients]),
            "synthetic_kept": _mean([c.get("synthetic_kept") for c in clients]),
            "upload_mb": rec.get("upload_bytes", 0) / 1e6,
            "seconds": rec["seconds"]["round"],
            **{f"s_{k}": _mean(v) for k, v in phases.items()},
        })
    return rows


def eval_rows(records: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per evaluation set: one row per evaluated round."""
    by_set: dict[str, list[dict[str, float]]] = defaultdict(list)
    for rec in (r for r in records if r.get("kind") == "eval" and r.get("target", "global") == "global"):
        for name, metrics in rec["results"].items():
            by_set[name].append({"round": rec["round"], **metrics})
    return dict(by_set)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return str(int(value)) if value.is_integer() and abs(value) < 1e9 else f"{value:.3f}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c, float("nan"))) for c in columns) + " |\n" for r in rows)


def _plot(path: Path, title: str, series: dict[str, tuple[list[float], list[float]]], ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_path: Path) -> Path:
    run = RunDir(run_path)
    config = run.config()
    records = run.metrics()
    rounds = round_rows(records)
    evals = eval_rows(records)
    status = run.read_status()
    lines = [f"# fedpit run: {config.name} ({config.method.name})", ""]
    lines += [f"- status: {status.get('status', 'unknown')}",
              f"- method: `{config.method.name}` {config.method.options or ''}",
              f"- model: `{config.model.name}` ({config.model.dtype}), LoRA rank {config.lora.rank}",
              f"- data: {config.data.source}, {status.get('federation', {}).get('clients', '?')} clients, "
              f"{config.federation.rounds} rounds, {config.federation.clients_per_round or 'all'} per round",
              f"- seed: {config.seed}", ""]
    plots = []
    for metric in UTILITY_METRICS:
        series = {name: ([r["round"] for r in rows if metric in r], [r[metric] for r in rows if metric in r])
                  for name, rows in evals.items()}
        series = {k: v for k, v in series.items() if v[0]}
        if series:
            file = f"utility_{metric}.png"
            _plot(run.path / file, f"global model: {metric} on held-out sets", series, metric)
            plots.append(file)
    if rounds:
        loss_series = {"private": ([r["round"] for r in rounds], [r["loss_private"] for r in rounds])}
        if any(not math.isnan(r["loss_synthetic"]) for r in rounds):
            loss_series["synthetic"] = ([r["round"] for r in rounds], [r["loss_synthetic"] for r in rounds])
        _plot(run.path / "train_loss.png", "mean client training loss", loss_series, "loss")
        plots.append("train_loss.png")
    lines += ["## Utility of the global model (held-out)", ""]
    for name, rows in evals.items():
        columns = ["round"] + [m for m in ("rougeL", "nll", "perplexity", "accuracy") if m in rows[0]]
        lines += [f"### {name}", "", _table(rows, columns)]
    if rounds:
        lines += ["## Rounds (means over sampled clients)", ""]
        columns = ["round", "clients", "loss_private", "loss_synthetic", "synthetic_generated", "synthetic_passed",
                   "synthetic_kept", "upload_mb", "seconds"]
        lines += [_table(rounds, columns)]
        phase_cols = sorted({k for r in rounds for k in r if k.startswith("s_")})
        if phase_cols:
            lines += ["### Seconds per client by phase", "", _table(rounds, ["round", *phase_cols])]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    report = run.path / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
