"""Utility of a model without external services: ROUGE-L of generated answers against references,
mean NLL of the reference answers, and PubMedQA yes/no/maybe accuracy: `accuracy` takes the decision
the model finds likeliest as the first word of its answer (the usual zero-shot reading, which works
for small models that rarely state a decision), `accuracy_generated` the first yes/no/maybe word of
the generated answer.

Every figure is kept per example, beside the answer it came from: a difference between two
methods is only measurable when both were scored on the same examples (paired), and an answer
that was not kept can never be judged or re-scored later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedpit.engines.generation import DecodingOptions, generate
from fedpit.engines.scoring import option_logprobs, reference_nll
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.textmetrics import rouge_l
from fedpit.types import AdapterState, Example

DECISIONS = ("yes", "no", "maybe")
DECISION = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)
PER_EXAMPLE_METRICS = ("nll", "rougeL", "correct")
"""Per-example fields that a set's summary averages and a comparison pairs."""


@dataclass(frozen=True)
class EvalOptions:
    max_new_tokens: int = 128
    batch_size: int = 16
    max_length: int = 512


@dataclass
class SetResult:
    """One evaluation set: the summary figures and one record per example (its answer included)."""

    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def answers(self) -> list[str]:
        return [r["answer"] for r in self.records]


def decision_of(text: str) -> str | None:
    """The first yes/no/maybe word of an answer: how a PubMedQA decision is read from free text."""
    match = DECISION.search(text)
    return match.group(1).lower() if match else None


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    """Set-level figures as means of the per-example ones (so re-scored records give the same summary)."""
    nll = sum(r["nll"] for r in records) / len(records)
    metrics = {"rougeL": sum(r["rougeL"] for r in records) / len(records), "nll": nll,
               "perplexity": math.exp(min(50.0, nll)), "n": float(len(records))}
    for key, name in (("correct", "accuracy"), ("correct_generated", "accuracy_generated")):
        if all(key in r for r in records):
            metrics[name] = sum(r[key] for r in records) / len(records)
    return metrics


def evaluate_set(
    handle: ModelHandle,
    fmt: PromptFormat,
    examples: list[Example],
    options: EvalOptions,
    on_progress: Callable[[int, int], None] | None = None,
) -> SetResult:
    """Answers, per-example figures and their summary for the adapter currently in the slot."""
    prompts = [fmt.render(e.instruction, e.input) for e in examples]
    decoding = DecodingOptions(max_new_tokens=options.max_new_tokens, stop_strings=tuple(fmt.stop_strings),
                               max_prompt_tokens=max(16, options.max_length - options.max_new_tokens))
    answers = generate(handle, prompts, decoding, batch_size=options.batch_size, on_batch=on_progress)
    nlls = reference_nll(handle, fmt, examples, options.max_length, options.batch_size)
    decided = [i for i, e in enumerate(examples) if e.meta.get("decision")]
    choices = dict(zip(decided, option_logprobs(handle, [prompts[i] for i in decided], DECISIONS, options.max_length,
                                                options.batch_size))) if decided else {}
    records = []
    for index, (example, answer, nll) in enumerate(zip(examples, answers, nlls)):
        record: dict[str, Any] = {"id": example.id, "instruction": example.instruction, "input": example.input,
                                  "reference": example.output, "answer": answer, "nll": nll,
                                  "rougeL": rouge_l(example.output, answer)}
        decision = example.meta.get("decision")
        if decision:
            scores = choices[index]
            record["decision"] = decision
            record["scored_decision"] = DECISIONS[max(range(len(DECISIONS)), key=scores.__getitem__)]
            record["correct"] = float(record["scored_decision"] == decision)
            record["generated_decision"] = decision_of(answer)
            record["correct_generated"] = float(record["generated_decision"] == decision)
        records.append(record)
    return SetResult(metrics=summarise(records), records=records)


def evaluate(
    handle: ModelHandle,
    fmt: PromptFormat,
    adapter: AdapterState,
    eval_sets: dict[str, list[Example]],
    options: EvalOptions,
    on_progress: Callable[[str, int, int], None] | None = None,
    label: str = "eval",
) -> dict[str, SetResult]:
    handle.set_adapter(adapter)
    results = {}
    with handle.inference():  # one adapter merge for every set's generation and scoring
        for name, examples in eval_sets.items():
            if not examples:
                continue
            callback = (lambda d, t, n=name: on_progress(f"{label} {n}", d, t)) if on_progress else None
            results[name] = evaluate_set(handle, fmt, examples, options, callback)
    return results
