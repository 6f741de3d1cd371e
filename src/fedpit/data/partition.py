"""Split examples across simulated clients with flwr-datasets' partitioners.

Using Flower's own partitioners (rather than a hand-written split) keeps the non-IID settings
comparable with other Flower-based federated studies. They work on a `datasets.Dataset`, so
the examples are represented by their position plus the label being split on, and mapped back.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from typing import Any

import numpy as np

from fedpit.errors import DataError
from fedpit.types import Example

PARTITION_KINDS = ("iid", "dirichlet", "natural")
_INDEX, _LABEL = "index", "label"
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_client_id(value: Any) -> str:
    """Client ids end up in file names and log keys, so keep them to a portable character set."""
    return _UNSAFE_ID_CHARS.sub("_", str(value)).strip("_") or "_"


def _labels(examples: list[Example], by: str) -> list[str]:
    """Strings, because the partitioners sort the distinct labels and mixed types do not sort."""
    for example in examples:
        if by not in example.meta:
            keys = sorted({key for e in examples for key in e.meta})
            raise DataError(
                f"cannot partition by '{by}': example {example.id} has no meta '{by}'; "
                f"available: {', '.join(keys) or 'none'} (for 'cluster', run the few-shot selection first)"
            )
    return [str(example.meta[by]) for example in examples]


def _check_counts(kind: str, num_clients: int, num_examples: int, alpha: float, min_size: int) -> None:
    if kind not in PARTITION_KINDS:
        raise DataError(f"unknown partition kind '{kind}'; choose one of {', '.join(PARTITION_KINDS)}")
    if num_examples == 0:
        raise DataError("no examples to partition; check the data source")
    if min_size < 1:
        raise DataError(f"partition min_size must be at least 1, got {min_size}")
    if kind != "natural" and not 1 <= num_clients <= num_examples:
        raise DataError(
            f"num_clients must be between 1 and the number of examples ({num_examples}), got {num_clients}"
        )
    if kind == "dirichlet" and not alpha > 0:
        raise DataError(f"Dirichlet alpha must be greater than 0, got {alpha}")


def _numbered_ids(count: int) -> list[str]:
    """Zero-padded so that sorting the ids as strings keeps the numeric order."""
    width = max(2, len(str(count - 1)))
    return [f"client-{i:0{width}d}" for i in range(count)]


def _split_indices(
    examples: list[Example], kind: str, num_clients: int, by: str, alpha: float, seed: int, min_size: int
) -> dict[str, list[int]]:
    """Client id -> positions in `examples`; the flwr-datasets part, imported late because it is slow."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if kind == "iid":
        # IidPartitioner cuts contiguous shards and takes no seed, so shuffle first; otherwise a
        # source-ordered list would give each client one source.
        order = np.random.default_rng(seed).permutation(len(examples)).tolist()
        partitioner: Any = IidPartitioner(num_partitions=num_clients)
        partitioner.dataset = Dataset.from_dict({_INDEX: order})
        ids = _numbered_ids(num_clients)
    else:
        labels = _labels(examples, by)
        dataset = Dataset.from_dict({_INDEX: list(range(len(examples))), _LABEL: labels})
        if kind == "dirichlet":
            partitioner = DirichletPartitioner(
                num_partitions=num_clients,
                partition_by=_LABEL,
                alpha=float(alpha),
                min_partition_size=min_size,
                seed=seed,
            )
        else:
            partitioner = NaturalIdPartitioner(partition_by=_LABEL)
        partitioner.dataset = dataset
    # The Dirichlet partitioner warns on each of its retries and the natural one draws a tqdm
    # bar; both are noise here because failure is reported below as one DataError.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            count = partitioner.num_partitions
            parts = [sorted(partitioner.load_partition(p)[_INDEX]) for p in range(count)]
        except ValueError as exc:
            if kind != "dirichlet":
                raise
            raise DataError(
                f"a Dirichlet split (alpha={alpha}) of {len(examples)} examples over '{by}' could not "
                f"give each of {num_clients} clients at least {min_size} examples ({exc}); "
                "lower num_clients, raise alpha, or add data"
            ) from None
    if kind == "natural":
        ids = [sanitize_client_id(partitioner.partition_id_to_natural_id[p]) for p in range(count)]
        if len(set(ids)) != len(ids):
            raise DataError(
                f"values of meta '{by}' collide after keeping only [A-Za-z0-9_-] in client ids; "
                "rename the values so they differ in those characters"
            )
    elif kind == "dirichlet":
        ids = _numbered_ids(count)
    return dict(zip(ids, parts, strict=True))


def partition_examples(
    examples: list[Example],
    kind: str,
    num_clients: int,
    by: str = "cluster",
    alpha: float = 1.0,
    seed: int = 0,
    min_size: int = 1,
) -> dict[str, list[Example]]:
    """Client id -> that client's examples; every example goes to exactly one client.

    "iid": a seeded shuffle cut into equal shares. "dirichlet": label skew over `meta[by]`, smaller
    `alpha` = more skew. "natural": one client per distinct `meta[by]` (e.g. per NIH site), ignoring
    `num_clients`. The result is a function of the arguments (and `seed`) alone; clients come in
    sorted id order and keep their examples in input order.
    """
    _check_counts(kind, num_clients, len(examples), alpha, min_size)
    split = _split_indices(examples, kind, num_clients, by, alpha, seed, min_size)
    small = {client: len(indices) for client, indices in split.items() if len(indices) < min_size}
    if small:
        client, size = min(small.items(), key=lambda item: item[1])
        fix = "drop or merge rare values" if kind == "natural" else "lower num_clients or add data"
        raise DataError(
            f"{kind} partition: client {client} gets {size} examples, fewer than min_size={min_size}; {fix}"
        )
    return {client: [examples[i] for i in split[client]] for client in sorted(split)}
