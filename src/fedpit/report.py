"""`report.md` and PNG plots from a run directory's metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpit.runs import RunDir, atomic_write_text  # noqa: E402

UTILITY_METRICS = ("rougeL", "nll", "accuracy")

COVERS_RECORD = ("record-level (epsilon, delta)-DP for every client's private examples (one example added or "
                 "removed), covering each upload and the global model, which are computed from DP-SGD outputs "
                 "only; not covered: example counts and timings, which the server also sees")
COVERS_RECORD_SYNTHETIC = ("epsilon covers ONLY the training steps on private examples (FedPIT: W_l). The synthetic "
                           "samples were written by the global model with the client's private examples in its "
                           "prompts and filtered against its private text; no DP guarantee covers that path, so "
                           "the upload (FedPIT: W_a = beta*W_l + (1-beta)*W_s) and the global model have NO formal "
                           "guarantee. With synth.demonstrations='public' the synthetic path reads no private text "
                           "and epsilon covers the upload")
COVERS_CLIENT = ("client-level (epsilon, delta)-DP of the global model (one client's whole data added or removed); "
                 "the server itself still sees every individual upload")


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
    """Per evaluation set: one row per evaluated round (the per-round curve of the global model)."""
    by_set: dict[str, list[dict[str, float]]] = defaultdict(list)
    for rec in records:
        if rec.get("kind") == "eval" and rec.get("target", "global") == "global" and rec.get("stage") != "final":
            for name, metrics in rec["results"].items():
                by_set[name].append({"round": rec["round"], **metrics})
    return dict(by_set)


def dp_summary(records: list[dict[str, Any]], config) -> dict[str, Any]:
    """The differential privacy a run had ({} without any): record-level epsilon per client (the last
    cumulative value each client reported; the run's figure is the largest, the guarantee every
    client has), client-level epsilon after the last round, and in words what each covers."""
    from fedpit.methods import METHODS

    summary: dict[str, Any] = {}
    rounds = [r for r in records if r.get("kind") == "round"]
    if config.privacy.dp.enabled:
        per_client: dict[str, float] = {}
        for rec in rounds:
            for client, figures in rec["clients"].items():
                if figures.get("dp_epsilon") is not None:
                    per_client[client] = figures["dp_epsilon"]
        # public demonstrations: the synthetic data reads no private text, so DP-SGD covers it too
        synthetic = METHODS.get(config.method.name).uses_synthetic and config.synth.demonstrations == "private"
        summary["record"] = {
            "epsilon": max(per_client.values()) if per_client else float("nan"),
            "epsilon_mean": _mean(list(per_client.values())), "per_client": per_client,
            "delta": config.privacy.dp.delta, "accountant": config.privacy.dp.accountant,
            "covers": COVERS_RECORD_SYNTHETIC if synthetic else COVERS_RECORD, "covers_upload": not synthetic}
    if config.privacy.client_dp.enabled:
        last = next((r["client_dp"] for r in reversed(rounds) if "client_dp" in r), {})
        summary["client"] = {"epsilon": last.get("epsilon", float("nan")), "delta": config.privacy.client_dp.delta,
                             "accountant": config.privacy.client_dp.accountant, "covers": COVERS_CLIENT}
    return summary


def rounds_epsilon(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round, the privacy spent so far: record-level epsilon (largest over the clients that reported
    it that round) and client-level epsilon."""
    rows = []
    for rec in (r for r in records if r.get("kind") == "round"):
        values = [c["dp_epsilon"] for c in rec["clients"].values() if c.get("dp_epsilon") is not None]
        row: dict[str, Any] = {"round": rec["round"]}
        if values:
            row["record epsilon (max over clients)"] = max(values)
        if "client_dp" in rec:
            row["client-level epsilon"] = rec["client_dp"]["epsilon"]
            row["clients clipped"] = rec["client_dp"]["clipped"]
        if len(row) > 1:
            rows.append(row)
    return rows


def dp_lines(summary: dict[str, Any], per_round: list[dict[str, Any]]) -> list[str]:
    """report.md's differential-privacy section: the guarantee, in numbers and in words."""
    if not summary:
        return []
    lines = ["## Differential privacy", ""]
    if "record" in summary:
        record = summary["record"]
        clients = ", ".join(f"{c} {e:.2f}" for c, e in sorted(record["per_client"].items()))
        lines += [f"**Record-level DP-SGD**: epsilon = {record['epsilon']:.2f} at delta = {record['delta']:g} "
                  f"(the largest over clients, {record['accountant']} accountant; per client: {clients}).", "",
                  f"What it covers: {record['covers']}.", ""]
    if "client" in summary:
        client = summary["client"]
        lines += [f"**Client-level DP (DP-FedAvg)**: epsilon = {client['epsilon']:.2f} at delta = {client['delta']:g} "
                  f"({client['accountant']} accountant).", "", f"What it covers: {client['covers']}.", ""]
    if per_round:
        lines += [_table(per_round, list(dict.fromkeys(k for r in per_round for k in r)))]
    return lines


def final_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final evaluation on whole held-out sets: one row per (model, set); model is "global" or
    "personal <client>"."""
    rows = []
    for rec in records:
        if rec.get("kind") == "eval" and rec.get("stage") == "final":
            model = "global" if rec.get("target") == "global" else f"personal {rec.get('client')}"
            rows += [{"model": model, "set": name, **metrics} for name, metrics in rec["results"].items()]
    return rows


LEAKAGE_KEYS = ("memorization_rougeL", "memorization_frac_above_0.5", "extraction_exact_rate",
                "extraction_mean_prefix_tokens", "mia_loss_auc", "mia_ref_auc", "mia_ref_tpr_at_1fpr",
                "canary_exposure_sampled", "canary_exposure_extrapolated")


def privacy_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (round, target, source): figures averaged over clients for uploads / private."""
    groups: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for rec in (r for r in records if r.get("kind") == "privacy"):
        groups[(rec["round"], rec["target"], rec.get("source", "run"))].append(rec["figures"])
    rows = []
    for (round_num, target, source), figures in sorted(groups.items()):
        row: dict[str, Any] = {"round": round_num, "target": target, "source": source, "n": len(figures)}
        for key in LEAKAGE_KEYS:
            row[key] = _mean([f.get(key) for f in figures])
        rows.append(row)
    return rows


def synthetic_overlap(run_path: Path) -> list[float]:
    """ROUGE-L of each kept synthetic sample against its client's private examples (the paper's
    check that self-generation does not copy private text)."""
    values = []
    for file in sorted((run_path / "clients").glob("*/synthetic/*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            if sample.get("selected"):
                values.append(sample["max_rouge_vs_private"])
    return values


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


def _leakage_plots(path: Path, leakage: list[dict[str, Any]], evals: dict[str, list[dict[str, float]]]) -> list[str]:
    files = []
    by_target: dict[str, tuple[list[float], list[float]]] = {}
    for row in leakage:
        if row["source"] == "run" and not math.isnan(row["memorization_rougeL"]):
            xs, ys = by_target.setdefault(row["target"], ([], []))
            xs.append(row["round"])
            ys.append(row["memorization_rougeL"])
    if by_target:
        _plot(path / "leakage.png", "discoverable memorisation per round", by_target, "ROUGE-L vs training answer")
        files.append("leakage.png")
    global_leak = {r["round"]: r["memorization_rougeL"] for r in leakage
                   if r["target"] == "global" and r["source"] == "run"}
    for name, rows in evals.items():
        points = [(global_leak[r["round"]], r["nll"], r["round"]) for r in rows if r["round"] in global_leak]
        if len(points) < 1:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for x, y, round_num in points:
            ax.annotate(f"r{round_num}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("leakage: memorisation ROUGE-L (global model)")
        ax.set_ylabel(f"{name} reference NLL (lower is better)")
        ax.set_title("utility vs leakage")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path / f"utility_vs_leakage_{name}.png", dpi=110)
        plt.close(fig)
        files.append(f"utility_vs_leakage_{name}.png")
    return files


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
    finals = final_rows(records)
    if finals:
        lines += ["## Final evaluation (whole held-out sets)", "",
                  "Every answer with its per-example figures is in `eval/final/<set>.jsonl` "
                  "(`fedpit judge` reads them).", "",
                  _table(finals, ["model", "set", "n", "rougeL", "nll", "perplexity",
                                  *(["accuracy"] if any("accuracy" in r for r in finals) else [])])]
    lines += ["## Utility of the global model per round (held-out subsets)", ""]
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
    leakage = privacy_rows(records)
    if leakage:
        lines += ["## Leakage", "",
                  "Attacks on the global model, each client's upload (the server's view, mean over clients) and the "
                  "private adapter W_l (reference). Memorisation: ROUGE-L of greedy continuations of training prompts; "
                  "extraction: first k response tokens reproduced exactly; MIA: loss and base-calibrated membership "
                  "AUC; canary: exposure in bits.", "",
                  _table(leakage, ["round", "target", "source", "n", *LEAKAGE_KEYS])]
        plots += _leakage_plots(run.path, leakage, evals)
    lines += dp_lines(dp_summary(records, config), rounds_epsilon(records))
    overlap = synthetic_overlap(run.path)
    if overlap:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.hist(overlap, bins=20, range=(0, 1))
        ax.set_xlabel("max ROUGE-L of a kept synthetic sample vs the client's private examples")
        ax.set_ylabel("samples")
        fig.tight_layout()
        fig.savefig(run.path / "synthetic_overlap.png", dpi=110)
        plt.close(fig)
        plots.append("synthetic_overlap.png")
        lines += ["## Synthetic data vs private data", "",
                  f"{len(overlap)} kept synthetic samples; ROUGE-L against private examples: mean "
                  f"{_mean(overlap):.3f}, max {max(overlap):.3f} (filter threshold {config.synth.rouge_threshold}).",
                  ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    report = run.path / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
