"""Paired bootstrap intervals, checked against what independent computations say they must be."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpit.evaluation.stats import paired_difference, paired_matrix


def test_one_seed_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.2, 1.0, 400)
    result = paired_difference(diffs)
    assert result.mean == pytest.approx(diffs.mean())
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(len(diffs))  # CLT: the bootstrap must agree for a mean
    assert result.low == pytest.approx(diffs.mean() - half, abs=0.25 * half)
    assert result.high == pytest.approx(diffs.mean() + half, abs=0.25 * half)
    assert result.significant and result.seeds == 1 and result.examples == 400


def test_no_difference_is_not_significant():
    rng = np.random.default_rng(1)
    assert not paired_difference(rng.normal(0.0, 1.0, 300)).significant
    flat = paired_difference(np.zeros(50))  # identical answers: nothing to resample
    assert (flat.mean, flat.low, flat.high, flat.significant) == (0.0, 0.0, 0.0, False)


def test_several_seeds_resample_seeds_too():
    """A seed-level shift (training randomness) must widen the interval: with three seeds whose mean
    differences are -0.5, 0.1 and 0.7, the evidence for a positive difference is weak even though
    every seed has 300 examples; pooling the examples as one seed would call it significant."""
    rng = np.random.default_rng(2)
    matrix = np.stack([rng.normal(shift, 0.3, 300) for shift in (-0.5, 0.1, 0.7)])
    two_way = paired_difference(matrix)
    pooled = paired_difference(matrix.ravel())
    assert two_way.mean == pytest.approx(pooled.mean)
    assert pooled.significant and not two_way.significant
    assert (two_way.high - two_way.low) > 5 * (pooled.high - pooled.low)
    assert two_way.seeds == 3 and two_way.examples == 300


def test_pairs_are_matched_by_example_id_over_shared_examples():
    candidate = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 5.0, "b": 5.0}]
    reference = [{"b": 1.0, "a": 0.5, "c": 1.0}, {"a": 4.0, "b": 3.0, "x": 9.0}]
    matrix = paired_matrix(candidate, reference)
    assert matrix.tolist() == [[0.5, 1.0], [1.0, 2.0]]  # examples a and b, in id order
    assert paired_matrix([{}], [{"a": 1.0}]).size == 0
