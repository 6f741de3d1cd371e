"""Paired differences between the methods of a comparison, read from the runs' saved answers.

Each method's run for seed s is paired with the reference method's run for the same seed, and
each answer with the reference's answer to the same example (by id), so every difference is
measured on the same examples, clients and seeds. The interval comes from `evaluation.stats`
(two-way bootstrap over seeds and examples). Judge verdicts, where `fedpit judge` or `fedpit
compare` with `[eval.judge]` produced them, enter as per-example Win+Tie indicators.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpit.errors import FedpitError
from fedpit.evaluation.stats import Difference, paired_difference, paired_matrix
from fedpit.judging import REFERENCE, SCORE, latest_stage, load_verdicts
from fedpit.runs import RunDir

METRICS = {  # per-example field -> (label, higher is better)
    "nll": ("NLL", False),
    "rougeL": ("ROUGE-L", True),
    "correct": ("accuracy", True),
    "judge": ("judge Win+Tie", True),
}


@dataclass
class SetComparison:
    """One evaluation set: per method, the mean of each metric and its difference to the reference."""

    name: str
    examples: int
    means: dict[str, dict[str, float]] = field(default_factory=dict)
    differences: dict[str, dict[str, Difference]] = field(default_factory=dict)
    head_to_head: dict[str, dict[str, object]] = field(default_factory=dict)
    judged: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per row, the judge's verdicts against the reference answers summed over seeds (invalid included)."""


def per_example(run_path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {metric: {example id: value}}} of a run's final evaluation (or its last per-round one),
    judge Win+Tie included where verdicts against the references exist."""
    run = RunDir(run_path)
    if not (run.path / "eval").is_dir():
        return {}  # a run with evaluation off has nothing to pair
    stage = latest_stage(run)
    values: dict[str, dict[str, dict[str, float]]] = {}
    for name, records in run.load_answers(stage).items():
        metrics = {m: {r["id"]: float(r[m]) for r in records if r.get(m) is not None} for m in METRICS if m != "judge"}
        verdicts = load_verdicts(run_path, stage, name, REFERENCE)
        metrics["judge"] = {i: float(v != "lose") for i, v in verdicts.items() if v != "invalid"}
        values[name] = {m: v for m, v in metrics.items() if v}
    return values


def compare_to_reference(groups: dict[str, list[Path]], reference: str) -> list[SetComparison]:
    """`groups`: label -> its runs, one per seed in the same seed order for every label."""
    if reference not in groups:
        raise FedpitError(f"reference '{reference}' is not one of the compared rows ({', '.join(groups)})")
    values = {label: [per_example(p) for p in paths] for label, paths in groups.items()}
    sets = sorted({name for runs in values.values() for run in runs for name in run})
    comparisons = []
    for name in sets:
        ref_runs = [run.get(name, {}) for run in values[reference]]
        examples = max((len(v) for run in ref_runs for v in run.values()), default=0)
        comparison = SetComparison(name=name, examples=examples)
        for label, runs in values.items():
            metrics = [run.get(name, {}) for run in runs]
            comparison.means[label] = {m: float(np.mean([x for run in metrics for x in run.get(m, {}).values()]))
                                       for m in METRICS if any(run.get(m) for run in metrics)}
            counts = reference_verdict_counts(groups[label], name)
            if any(counts.values()):
                comparison.judged[label] = counts
            if label == reference:
                continue
            comparison.differences[label] = {}
            for metric in METRICS:
                matrix = paired_matrix([run.get(metric, {}) for run in metrics],
                                       [run.get(metric, {}) for run in ref_runs])
                if matrix.size:
                    comparison.differences[label][metric] = paired_difference(matrix)
            head = head_to_head(groups[label], groups[reference], name)
            if head:
                comparison.head_to_head[label] = head
        comparisons.append(comparison)
    return comparisons


def reference_verdict_counts(runs: list[Path], set_name: str) -> dict[str, int]:
    counts = {"win": 0, "tie": 0, "lose": 0, "invalid": 0}
    for path in runs:
        if (Path(path) / "judge").is_dir():
            for verdict in load_verdicts(path, latest_stage(RunDir(path)), set_name, REFERENCE).values():
                counts[verdict] += 1
    return counts


def head_to_head(candidate_runs: list[Path], reference_runs: list[Path], set_name: str) -> dict[str, object]:
    """Counts and intervals of the judge's verdicts of each candidate run against the reference run of
    the same seed ({} when they were not judged head to head)."""
    scores, counts = [], {"win": 0, "tie": 0, "lose": 0, "invalid": 0}
    for candidate, reference in zip(candidate_runs, reference_runs):
        if not (Path(candidate) / "judge").is_dir():
            continue
        verdicts = load_verdicts(candidate, latest_stage(RunDir(candidate)), set_name, Path(reference).name)
        for verdict in verdicts.values():
            counts[verdict] += 1
        scores.append({i: SCORE[v] for i, v in verdicts.items() if v != "invalid"})
    if not any(counts.values()):
        return {}
    matrix = paired_matrix(scores, [dict.fromkeys(s, 0.0) for s in scores])  # examples every seed judged
    if not matrix.size:  # every verdict invalid: still shown, with no interval
        nothing = paired_difference(np.full((1, 1), np.nan))
        return {**counts, "win_tie": nothing, "net": nothing}
    return {**counts, "win_tie": paired_difference((matrix >= 0).astype(float)), "net": paired_difference(matrix)}


def verdict_words(differences: dict[str, Difference]) -> str:
    """'better' / 'worse' per metric whose interval excludes 0, 'n.s.' otherwise."""
    words = []
    for metric, diff in differences.items():
        label, higher_is_better = METRICS[metric]
        if diff.significant:
            better = (diff.mean > 0) == higher_is_better
            words.append(f"{label} {'better' if better else 'worse'}")
        else:
            words.append(f"{label} n.s.")
    return ", ".join(words)
