"""Paired differences between two methods with 95% bootstrap confidence intervals.

A comparison is paired: both methods answered the same held-out examples (`eval.seed` fixes the
sets across training seeds), so what is resampled is the per-example difference, not two
independent means; that removes the example-to-example spread, which at these sizes is larger
than the differences between methods.

With several seeds the differences form a seeds x examples matrix, and the interval resamples
seeds and examples independently (a two-way bootstrap), so it covers both the randomness of
training and the choice of evaluation examples. scipy's `bootstrap` does the resampling: the
matrix's row and column *indices* are its two samples, which it resamples independently because
they are not paired with each other.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

CONFIDENCE = 0.95
RESAMPLES = 9999


@dataclass(frozen=True)
class Difference:
    """mean(candidate − reference) over seeds and examples, with its confidence interval."""

    mean: float
    low: float
    high: float
    seeds: int
    examples: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def describe(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "–"
        text = f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return f"**{text}**" if self.significant else text


def paired_difference(differences: np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                      seed: int = 0) -> Difference:
    """`differences[s, i]`: candidate minus reference on example i of seed s (a 1-D array is one seed)."""
    matrix = np.atleast_2d(np.asarray(differences, dtype=float))
    seeds, examples = matrix.shape
    mean = float(matrix.mean()) if matrix.size else float("nan")
    if examples < 2:
        return Difference(mean, float("nan"), float("nan"), seeds, examples)
    if np.allclose(matrix, matrix.flat[0]):  # no spread (e.g. identical answers): the interval is the point
        return Difference(mean, mean, mean, seeds, examples)

    def over_examples(cols, axis=-1):
        return matrix[0][cols].mean(axis=-1)

    def over_seeds_and_examples(rows, cols, axis=-1):
        return matrix[rows[..., :, None], cols[..., None, :]].mean(axis=(-1, -2))

    data = (np.arange(examples),) if seeds == 1 else (np.arange(seeds), np.arange(examples))
    statistic = over_examples if seeds == 1 else over_seeds_and_examples
    interval = None
    for method in ("BCa", "percentile"):  # BCa corrects skew; it is undefined for degenerate resamples
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = bootstrap(data, statistic, paired=False, vectorized=True, n_resamples=resamples, batch=500,
                               confidence_level=confidence, method=method, random_state=seed)
        interval = result.confidence_interval
        if np.isfinite(interval.low) and np.isfinite(interval.high):
            break
    return Difference(mean, float(interval.low), float(interval.high), seeds, examples)


def paired_matrix(candidate: list[dict[str, float]], reference: list[dict[str, float]]) -> np.ndarray:
    """Seeds x examples matrix of candidate − reference from per-seed {example id: value} maps, over
    the seeds both have and the examples every one of those seeds has (pairing is by example id)."""
    pairs = [(c, r) for c, r in zip(candidate, reference) if c and r]
    if not pairs:
        return np.empty((0, 0))
    common = set.intersection(*(set(c) & set(r) for c, r in pairs))
    ids = sorted(common)
    return np.array([[c[i] - r[i] for i in ids] for c, r in pairs], dtype=float).reshape(len(pairs), len(ids))
