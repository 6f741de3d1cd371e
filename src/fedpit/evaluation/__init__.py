"""Evaluation: utility metrics kept per example (`metrics`), paired bootstrap confidence intervals
between methods (`stats`), and the pairwise LLM judge over an OpenAI-compatible endpoint (`judge`).

`metrics` runs the model; `stats` and `judge` read saved answers only, so a finished run can be
compared and judged again without loading a model.
"""

from fedpit.evaluation.metrics import (
    PER_EXAMPLE_METRICS,
    EvalOptions,
    SetResult,
    decision_of,
    evaluate,
    evaluate_set,
    summarise,
)

__all__ = ["PER_EXAMPLE_METRICS", "EvalOptions", "SetResult", "decision_of", "evaluate", "evaluate_set", "summarise"]
