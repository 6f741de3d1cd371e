"""`frontier.md`: the privacy-utility frontier of FedPIT against what a user would otherwise do
(FedAvg with record- or client-level DP, or just training less). Every row ran on the same
clients, seeds and held-out examples; each is placed on utility (its paired NLL difference to a
reference row, with the 95% CI) against leakage (the `[privacy]` audit of its last attacked round)
and the rows no other row beats on both are the frontier."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpit.evaluation.stats import Difference  # noqa: E402
from fedpit.paired import SetComparison, compare_to_reference  # noqa: E402
from fedpit.report import dp_summary, privacy_rows  # noqa: E402
from fedpit.runs import RunDir, atomic_write_text  # noqa: E402

ROWS: dict[str, list[str]] = {  # label -> the overrides that make the row, on top of the config
    "fedavg": ["method.name='fedavg'"],
    "fedavg-dpsgd-eps1": ["method.name='fedavg'", "privacy.dp.enabled=true", "privacy.dp.target_epsilon=1"],
    "fedavg-dpsgd-eps4": ["method.name='fedavg'", "privacy.dp.enabled=true", "privacy.dp.target_epsilon=4"],
    "fedavg-dpsgd-eps16": ["method.name='fedavg'", "privacy.dp.enabled=true", "privacy.dp.target_epsilon=16"],
    # client-level DP: the config's [privacy.client_dp] table gives clip_norm and delta; the row switches it on
    "dp-fedavg": ["method.name='fedavg'", "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1.0"],
    "fedpit-beta0.25": ["method.name='fedpit'", "method.fedpit.beta=0.25"],
    "fedpit-beta0.5": ["method.name='fedpit'", "method.fedpit.beta=0.5"],
    "fedpit-beta0.75": ["method.name='fedpit'", "method.fedpit.beta=0.75"],
    "fedpit-dpsgd-eps4": ["method.name='fedpit'", "privacy.dp.enabled=true", "privacy.dp.target_epsilon=4"],
    # the same with public demonstrations: the synthetic path reads no private text, so epsilon covers the upload
    "fedpit-dpsgd-eps4-public": ["method.name='fedpit'", "privacy.dp.enabled=true", "privacy.dp.target_epsilon=4",
                                 "synth.demonstrations='public'"],
    # the free defence: one local optimiser step per round instead of whole epochs
    "fedavg-fewer-steps": ["method.name='fedavg'", "train.max_steps=1"],
}

LEAKAGE = {  # audit figure -> (its name on the page, digits); each is shown for the global model and uploads
    "canary_exposure_extrapolated": ("canary exposure (bits)", 1),
    "memorization_rougeL": ("memorisation ROUGE-L", 3),
    "mia_ref_auc": ("MIA AUC (calibrated)", 3),
}
MEASURES = {  # Pareto measure -> (target, figure); lower is less leakage for each
    "global_canary": ("global", "canary_exposure_extrapolated"),
    "global_memorization": ("global", "memorization_rougeL"),
    "global_mia": ("global", "mia_ref_auc"),
    "upload_canary": ("upload", "canary_exposure_extrapolated"),
    "upload_mia": ("upload", "mia_ref_auc"),
}
MAIN_SET = "medquad"  # the in-distribution set: the utility axis of the plots


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Labels of the non-dominated points when both coordinates are to be minimised: no other point
    is lower-or-equal in both and strictly lower in one. Identical points do not dominate each
    other; a point with a NaN coordinate is left out (it cannot be placed)."""
    finite = {k: p for k, p in points.items() if not any(math.isnan(v) for v in p)}

    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])

    return {k for k, p in finite.items() if not any(dominates(q, p) for q in finite.values())}


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(finite) if finite else float("nan")


def run_leakage(records: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(target, figure) -> value at the run's last attacked round; uploads are already the mean over
    clients (`privacy_rows`). Attacks run afterwards by `fedpit attack` are not mixed in."""
    rows = [r for r in privacy_rows(records) if r["source"] == "run"]
    if not rows:
        return {}
    last = max(r["round"] for r in rows)
    return {(r["target"], key): r[key] for r in rows if r["round"] == last for key in LEAKAGE}


def row_figures(paths: list[Path]) -> dict[str, Any]:
    """One row over its seeds: "leakage" {(target, figure): mean over seeds} and, where the row had
    DP, "record" / "client" from `dp_summary` with epsilon the largest over seeds (and clients): the
    guarantee every client of every seed has."""
    runs = [RunDir(p) for p in paths]
    leakage = [run_leakage(run.metrics()) for run in runs]
    keys = {k for run in leakage for k in run}
    figures: dict[str, Any] = {"leakage": {k: _mean([run.get(k) for run in leakage]) for k in keys}}
    dp = [dp_summary(run.metrics(), run.config()) for run in runs]
    for level in ("record", "client"):
        found = [d[level] for d in dp if level in d]
        if found:
            epsilons = [f["epsilon"] for f in found if not math.isnan(f["epsilon"])]
            figures[level] = {**found[0], "epsilon": max(epsilons, default=math.nan)}
    return figures


def covers_cell(figures: dict[str, Any]) -> str:
    """What the row's DP guarantee covers, in a few words (the full texts are under the table)."""
    cells = []
    if "record" in figures:
        cells.append("uploads + global" if figures["record"]["covers_upload"]
                     else "W_l only (no guarantee on upload/global)")
    if "client" in figures:
        cells.append("global model, client-level")
    return "; ".join(cells) or "none"


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _epsilon(dp: dict[str, Any] | None) -> str:
    return "–" if dp is None else f"{_number(dp['epsilon'], 2)} (δ {dp['delta']:g})"


def _delta(comparison: SetComparison, label: str, reference: str) -> str:
    if label == reference:
        return f"{_number(comparison.means.get(label, {}).get('nll'))} (reference)"
    diff: Difference | None = comparison.differences.get(label, {}).get("nll")
    if diff is None or math.isnan(diff.mean):
        return "–"
    return diff.describe() + ("" if diff.significant else " n.s.")


def _utility(comparisons: list[SetComparison], reference: str) -> tuple[str, dict[str, tuple[float, float, float]]]:
    """The main set's name and, per row, (Δ NLL, CI low, CI high); the reference is 0 without a CI."""
    main = next((c for c in comparisons if c.name == MAIN_SET), comparisons[0] if comparisons else None)
    if main is None:
        return MAIN_SET, {}
    ys = {label: (d["nll"].mean, d["nll"].low, d["nll"].high) for label, d in main.differences.items() if "nll" in d}
    if "nll" in main.means.get(reference, {}):
        ys[reference] = (0.0, 0.0, 0.0)
    return main.name, ys


def _plot(root: Path, measure: str, points: dict[str, tuple[float, float]], cis: dict[str, tuple[float, float]],
          front: set[str], main: str, reference: str) -> str:
    """One measure: every row at (leakage, Δ NLL) with its CI, labelled; the frontier as a step line."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for label, (x, y) in points.items():
        low, high = cis[label]
        colour = "tab:red" if label in front else "tab:gray"
        ax.errorbar([x], [y], yerr=[[y - low], [high - y]] if not math.isnan(low) else None, fmt="o",
                    color=colour, capsize=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    line = sorted(points[label] for label in front)
    ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="tab:red", linewidth=1, alpha=0.7)
    target, figure = MEASURES[measure]
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel(f"{target} {LEAKAGE[figure][0]} (lower: less leakage)")
    ax.set_ylabel(f"Δ {main} NLL vs {reference} (lower: better)")
    ax.set_title(f"privacy-utility frontier: {measure} (red: non-dominated on means; bars: 95% CI)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    file = f"pareto_{measure}.png"
    fig.savefig(root / file, dpi=110)
    plt.close(fig)
    return file


def _intro(rows: int, seeds: int, reference: str, main: str) -> list[str]:
    """What the page measures, so a reader can weigh the table without the code."""
    return [f"# Privacy-utility frontier against {reference}", "",
            f"{rows} rows on the same clients, seeds ({seeds} each) and held-out examples. Utility: the final "
            f"global model's NLL per token on each final set, as the paired difference Δ = row − {reference} on the "
            "same examples (mean over seeds and examples, 95% bootstrap CI; **bold**: the CI excludes 0, n.s.: it "
            f"does not; lower is better; {reference}'s row gives its absolute NLL). Leakage: the `[privacy]` audit "
            "of the last attacked round, global model / uploads (the server's view, mean over clients), mean over "
            "seeds; lower is less leakage. ε: record-level (DP-SGD, largest over clients and seeds) and "
            "client-level (DP-FedAvg), each with its δ. A row is on the frontier for a measure when no other row "
            f"has both lower-or-equal leakage and lower-or-equal Δ {main} NLL, one strictly lower. Measures: "
            + "; ".join(f"{m} = {t} {LEAKAGE[k][0]}" for m, (t, k) in MEASURES.items()) + ".", ""]


def _row(label: str, figures: dict[str, Any], comparisons: list[SetComparison], reference: str,
         fronts: dict[str, set[str]]) -> str:
    leak = [" / ".join(_number(figures["leakage"].get((target, k)), digits) for target in ("global", "upload"))
            for k, (_, digits) in LEAKAGE.items()]
    on = ", ".join(m for m in MEASURES if label in fronts[m]) or "–"
    cells = [label, _epsilon(figures.get("record")), _epsilon(figures.get("client")), covers_cell(figures),
             *(_delta(c, label, reference) for c in comparisons), *leak, on]
    return "| " + " | ".join(cells) + " |"


def write_frontier(root: Path, groups: dict[str, list[Path]], reference: str) -> Path:
    """`groups`: row label -> its run directories, one per seed in the same seed order for every row;
    `reference` is the row every utility difference is measured against."""
    comparisons = compare_to_reference(groups, reference)
    figures = {label: row_figures(paths) for label, paths in groups.items()}
    main, utility = _utility(comparisons, reference)
    comparisons.sort(key=lambda c: c.name != main)  # the utility axis first
    fronts: dict[str, set[str]] = {}
    plots = []
    for measure, key in MEASURES.items():
        points = {label: (figures[label]["leakage"].get(key, math.nan), utility.get(label, (math.nan,))[0])
                  for label in groups}
        points = {label: p for label, p in points.items() if not any(math.isnan(v) for v in p)}
        fronts[measure] = pareto_front(points)
        if points:
            cis = {label: utility[label][1:] for label in points}
            plots.append(_plot(root, measure, points, cis, fronts[measure], main, reference))
    lines = _intro(len(groups), max(len(p) for p in groups.values()), reference, main)
    header = ["row", "record ε", "client ε", "covers", *(f"Δ {c.name} NLL" for c in comparisons),
              *(f"{name} global / upload" for name, _ in LEAKAGE.values()), "on the frontier for"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(label, figures[label], comparisons, reference, fronts) for label in groups]
    covers = dict.fromkeys(f[level]["covers"] for f in figures.values() for level in ("record", "client") if level in f)
    lines += ["", "What each DP guarantee covers:" if covers else "No row ran with DP.", ""]
    lines += [f"- {text}" for text in covers] + ([""] if covers else [])
    unclear = [label for label, (_, low, high) in utility.items() if label != reference and not (low > 0 or high < 0)]
    lines += [f"The frontier is computed on the means (leakage mean over seeds, Δ {main} NLL mean over seeds and "
              f"examples), without their uncertainty. Rows whose Δ {main} NLL is not significant (CI includes 0): "
              f"{', '.join(unclear) or 'none'}. Leakage figures are single audits per seed, without intervals.", ""]
    lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), "",
              "Every figure and each run's report: [comparison.md](comparison.md).", ""]
    out = root / "frontier.md"
    atomic_write_text(out, "\n".join(lines))
    return out
