"""Utility of a model without external services: ROUGE-L of generated answers against references,
mean NLL of the reference answers, and PubMedQA yes/no/maybe accuracy.

The paper uses a GPT-4 judge (Win+Tie). Offline we cannot call one; `Judge` is the interface an
LLM-judge backend implements for users who have an endpoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedpit.engines.generation import DecodingOptions, generate
from fedpit.engines.scoring import reference_nll
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.textmetrics import rouge_l
from fedpit.types import AdapterState, Example

DECISION = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


class Judge(Protocol):
    """Pairwise LLM judge: returns "win", "tie" or "lose" for `answer` against `reference`."""

    def compare(self, instruction: str, answer: str, reference: str) -> str: ...


@dataclass(frozen=True)
class EvalOptions:
    max_new_tokens: int = 128
    batch_size: int = 16
    max_length: int = 512


def decision_of(text: str) -> str | None:
    """The first yes/no/maybe word of an answer: how a PubMedQA decision is read from free text."""
    match = DECISION.search(text)
    return match.group(1).lower() if match else None


def evaluate_set(
    handle: ModelHandle,
    fmt: PromptFormat,
    examples: list[Example],
    options: EvalOptions,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Metrics of the adapter currently in the slot on one evaluation set, plus its answers."""
    prompts = [fmt.render(e.instruction, e.input) for e in examples]
    decoding = DecodingOptions(max_new_tokens=options.max_new_tokens, stop_strings=tuple(fmt.stop_strings),
                               max_prompt_tokens=max(16, options.max_length - options.max_new_tokens))
    answers = generate(handle, prompts, decoding, batch_size=options.batch_size, on_batch=on_progress)
    rouges = [rouge_l(e.output, a) for e, a in zip(examples, answers)]
    nlls = reference_nll(handle, fmt, examples, options.max_length, options.batch_size)
    metrics = {
        "rougeL": sum(rouges) / len(rouges),
        "nll": sum(nlls) / len(nlls),
        "perplexity": math.exp(min(50.0, sum(nlls) / len(nlls))),
    }
    decisions = [e.meta.get("decision") for e in examples]
    if all(decisions):
        correct = [decision_of(a) == d for a, d in zip(answers, decisions)]
        metrics["accuracy"] = sum(correct) / len(correct)
    return metrics, answers


def evaluate(
    handle: ModelHandle,
    fmt: PromptFormat,
    adapter: AdapterState,
    eval_sets: dict[str, list[Example]],
    options: EvalOptions,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    handle.set_adapter(adapter)
    results = {}
    with handle.inference():  # one adapter merge for every set's generation and scoring
        for name, examples in eval_sets.items():
            callback = (lambda d, t, n=name: on_progress(f"eval {n}", d, t)) if on_progress else None
            results[name], _ = evaluate_set(handle, fmt, examples, options, callback)
    return results
