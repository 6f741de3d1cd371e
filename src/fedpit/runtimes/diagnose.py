"""`fedpit diagnose RUN_DIR`: how good was the synthetic data a run trained on, next to the private
data it stands in for?

FedPIT's W_s learns only from self-generated samples, so its utility cost against FedAvg is
bounded by their quality. The figures: how many generated instructions the filters passed (and
why the rest failed), how natural the kept responses are to the *untuned base model* (mean NLL
given the instruction: a fluent, on-topic answer scores low, a degenerate one high), how long and
how varied they are, how often a kept instruction repeats one the client already generated in
an earlier round, and how close kept samples come to private text. Written to
`synthetic_quality.json` in the run directory.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedpit.errors import FedpitError
from fedpit.evaluation.stats import paired_difference
from fedpit.progress import RunProgress
from fedpit.runs import RunDir, atomic_write_text, finite_json
from fedpit.runtimes.local import prepare
from fedpit.textmetrics import max_rouge_l
from fedpit.types import Example

NEAR_DUPLICATE = 0.7


def _samples(run: RunDir) -> list[dict[str, Any]]:
    rows = []
    for file in sorted((run.path / "clients").glob("*/synthetic/round-*.jsonl")):
        rows += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def _distinct_2(texts: list[str]) -> float:
    """Distinct word bigrams over all bigrams: low when responses repeat each other or themselves."""
    grams = [tuple(words[i:i + 2]) for words in (t.lower().split() for t in texts) for i in range(len(words) - 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def _repeats_earlier_rounds(samples: list[dict[str, Any]]) -> float:
    """Share of kept instructions within ROUGE-L > 0.7 of one their client generated in an earlier round."""
    repeats, total = 0, 0
    for sample in samples:
        if not sample["selected"]:
            continue
        earlier = [s["instruction"] for s in samples
                   if s["client"] == sample["client"] and s["round"] < sample["round"]]
        if earlier:
            total += 1
            repeats += max_rouge_l(sample["instruction"], earlier, NEAR_DUPLICATE) > NEAR_DUPLICATE
    return repeats / total if total else float("nan")


def _generation_counts(run: RunDir) -> dict[str, float]:
    counts: Counter = Counter()
    for record in (r for r in run.metrics() if r.get("kind") == "round"):
        for client in record["clients"].values():
            counts.update({k.removeprefix("synthetic_"): v for k, v in client.items()
                           if k.startswith("synthetic_") and isinstance(v, (int, float))})
    return dict(counts)


def _interval(values: list[float]) -> dict[str, float]:
    spread = paired_difference(np.array(values))
    return {"mean": spread.mean, "low": spread.low, "high": spread.high, "n": len(values)}


def synthetic_quality(run_path: Path, progress: RunProgress | None = None) -> dict[str, Any]:
    run = RunDir(run_path)
    samples = _samples(run)
    if not samples:
        raise FedpitError(f"'{run_path}' kept no synthetic samples (clients/*/synthetic/); only methods that "
                          f"self-generate (fedpit, fedmit, local_sg) with output.save_synthetic=true have them")
    config = run.config()
    progress = progress or RunProgress(quiet=True)
    exp = prepare(config)
    private = [e for examples in exp.federation.clients.values() for e in examples if not e.meta.get("canary")]
    kept = [s for s in samples if s["selected"]]
    as_examples = [Example(id=f"synthetic-{i}", instruction=s["instruction"], output=s["output"])
                   for i, s in enumerate(kept)]
    progress.phase("base-model NLL", 0, 1)
    from fedpit.engines.scoring import reference_nll

    exp.handle.set_adapter(exp.handle.fresh_adapter(0))  # LoRA B = 0: the untuned base model
    batch = config.eval.batch_size
    synthetic_nll = reference_nll(exp.handle, exp.fmt, as_examples, config.model.max_length, batch) if kept else []
    private_nll = reference_nll(exp.handle, exp.fmt, private, config.model.max_length, batch)
    generated = _generation_counts(run)
    instructions = generated.get("generated", 0.0)
    figures: dict[str, Any] = {
        "samples_passed": len(samples), "samples_kept": len(kept),
        "pass_rate": generated.get("passed", 0.0) / instructions if instructions else float("nan"),
        "filtered": {k.removeprefix("filtered_"): v for k, v in generated.items() if k.startswith("filtered_") and v},
        "base_nll_synthetic": _interval(synthetic_nll) if len(synthetic_nll) > 1 else None,
        "base_nll_private": _interval(private_nll),
        "response_words_synthetic": statistics.fmean(len(s["output"].split()) for s in kept) if kept else None,
        "response_words_private": statistics.fmean(len(e.output.split()) for e in private),
        "distinct_2_synthetic": _distinct_2([s["output"] for s in kept]),
        "distinct_2_private": _distinct_2([e.output for e in private]),
        "repeats_earlier_round": _repeats_earlier_rounds(samples),
        "rouge_vs_private_mean": statistics.fmean(s["max_rouge_vs_private"] for s in kept) if kept else None,
        "rouge_vs_private_above_0.5": (sum(s["max_rouge_vs_private"] > 0.5 for s in kept) / len(kept)) if kept
        else None,
    }
    atomic_write_text(run.path / "synthetic_quality.json", json.dumps(finite_json(figures), indent=2, allow_nan=False))
    return figures
