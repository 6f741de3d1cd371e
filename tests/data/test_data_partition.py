"""Client partitions: each example lands on exactly one client, reproducibly, with clear errors."""

from __future__ import annotations

from collections import Counter

import pytest

from fedpit.data import partition_examples
from fedpit.errors import DataError
from fedpit.types import Example

LABELS = ["alpha", "beta", "gamma", "delta"]


def make_examples(count: int = 200) -> list[Example]:
    """Sorted by label, like MedQuAD is sorted by source: an unshuffled split would be label-pure."""
    return [
        Example(
            id=f"ex{i:04d}",
            instruction=f"q{i}",
            output=f"a{i}",
            meta={"label": LABELS[i * len(LABELS) // count]},
        )
        for i in range(count)
    ]


def assert_exact_cover(clients: dict[str, list[Example]], examples: list[Example]) -> None:
    placed = [e.id for members in clients.values() for e in members]
    assert len(placed) == len(set(placed)) == len(examples)
    assert set(placed) == {e.id for e in examples}


def ids(clients: dict[str, list[Example]]) -> dict[str, list[str]]:
    return {client: [e.id for e in members] for client, members in clients.items()}


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural"])
def test_every_example_on_exactly_one_client(kind: str) -> None:
    examples = make_examples()
    clients = partition_examples(examples, kind, num_clients=5, by="label", alpha=0.5, seed=0)
    assert_exact_cover(clients, examples)
    assert list(clients) == sorted(clients)
    order = {e.id: i for i, e in enumerate(examples)}
    for members in clients.values():
        assert [order[e.id] for e in members] == sorted(order[e.id] for e in members)


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_deterministic_for_a_seed(kind: str) -> None:
    examples = make_examples()
    first = partition_examples(examples, kind, num_clients=6, by="label", alpha=0.3, seed=11)
    again = partition_examples(examples, kind, num_clients=6, by="label", alpha=0.3, seed=11)
    other = partition_examples(examples, kind, num_clients=6, by="label", alpha=0.3, seed=12)
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)


def test_iid_is_shuffled_and_balanced() -> None:
    examples = make_examples(203)
    clients = partition_examples(examples, "iid", num_clients=4, seed=0)
    assert list(clients) == ["client-00", "client-01", "client-02", "client-03"]
    sizes = [len(members) for members in clients.values()]
    assert max(sizes) - min(sizes) <= 1
    # Input is sorted by label; a contiguous cut would make every client single-label.
    assert all(len({e.meta["label"] for e in members}) == len(LABELS) for members in clients.values())


def test_iid_does_not_need_the_partition_field() -> None:
    examples = [Example(id=str(i), instruction="q", output="a") for i in range(10)]
    assert_exact_cover(partition_examples(examples, "iid", num_clients=3), examples)


def test_dirichlet_small_alpha_skews_labels() -> None:
    examples = make_examples(400)
    clients = partition_examples(examples, "dirichlet", num_clients=4, by="label", alpha=0.1, seed=0)
    shares = [
        max(Counter(e.meta["label"] for e in members).values()) / len(members) for members in clients.values()
    ]
    assert max(shares) > 0.6  # a uniform split would hold each label at ~25 %


def test_client_ids_are_padded_to_sort_numerically() -> None:
    examples = make_examples(300)
    clients = partition_examples(examples, "iid", num_clients=120, seed=0)
    assert list(clients)[:2] == ["client-000", "client-001"] and list(clients)[-1] == "client-119"


def test_natural_one_client_per_value_with_safe_ids() -> None:
    values = ["NIH site/1", "GARD", "GARD", "cdc.gov", "NIH site/1", "GARD"]
    examples = [
        Example(id=f"e{i}", instruction="q", output="a", meta={"site": v}) for i, v in enumerate(values)
    ]
    clients = partition_examples(examples, "natural", num_clients=0, by="site")
    assert ids(clients) == {"GARD": ["e1", "e2", "e5"], "NIH_site_1": ["e0", "e4"], "cdc_gov": ["e3"]}


def test_natural_by_medquad_source(medquad: list[Example]) -> None:
    clients = partition_examples(medquad, "natural", num_clients=10, by="source")
    assert len(clients) == 9
    assert len(clients["GHR_QA"]) == 5430 and len(clients["CDC_QA"]) == 270
    assert_exact_cover(clients, medquad)


def test_natural_ids_that_collide_are_an_error() -> None:
    examples = [
        Example(id=f"e{i}", instruction="q", output="a", meta={"site": v})
        for i, v in enumerate(["a b", "a/b"])
    ]
    with pytest.raises(DataError, match="collide"):
        partition_examples(examples, "natural", num_clients=0, by="site")


def test_impossible_dirichlet_is_a_data_error() -> None:
    examples = make_examples(12)
    with pytest.raises(DataError, match="lower num_clients, raise alpha, or add data") as info:
        partition_examples(examples, "dirichlet", num_clients=10, by="label", alpha=0.5, min_size=2)
    assert "\n" not in str(info.value)


def test_min_size_applies_to_iid_and_natural() -> None:
    examples = make_examples(20)
    with pytest.raises(DataError, match="fewer than min_size=6"):
        partition_examples(examples, "iid", num_clients=4, min_size=6)
    examples.append(Example(id="rare", instruction="q", output="a", meta={"label": "epsilon"}))
    with pytest.raises(DataError, match="client epsilon gets 1 examples"):
        partition_examples(examples, "natural", num_clients=0, by="label", min_size=2)


def test_missing_field_lists_available_keys() -> None:
    examples = make_examples(10)
    with pytest.raises(DataError, match=r"example ex0000 has no meta 'cluster'; available: label"):
        partition_examples(examples, "dirichlet", num_clients=2)


@pytest.mark.parametrize(
    ("kind", "num_clients", "message"),
    [
        ("random", 2, "unknown partition kind 'random'"),
        ("iid", 0, r"num_clients must be between 1 and the number of examples \(10\), got 0"),
        ("dirichlet", 11, r"num_clients must be between 1 and the number of examples \(10\), got 11"),
    ],
)
def test_bad_arguments(kind: str, num_clients: int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition_examples(make_examples(10), kind, num_clients=num_clients, by="label")


def test_non_positive_alpha() -> None:
    with pytest.raises(DataError, match="alpha must be greater than 0"):
        partition_examples(make_examples(10), "dirichlet", num_clients=2, by="label", alpha=0.0)


def test_no_examples() -> None:
    with pytest.raises(DataError, match="no examples"):
        partition_examples([], "natural", num_clients=0, by="label")
