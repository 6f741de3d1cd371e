"""Centralized: the paper's epochs spread exactly over the rounds; a round with no epoch keeps the
adapter. (That the pooled client holds every example is in test_baselines.py.)"""

from __future__ import annotations

import pytest
import torch

from fedpit import config as config_mod
from fedpit.methods import ClientContext, build_method
from fedpit.methods.centralized import epochs_in_round
from fedpit.types import ClientState, Example


@pytest.mark.parametrize("total, rounds, expected", [
    (10, 10, [1] * 10),
    (10, 3, [4, 3, 3]),
    (10, 1, [10]),
    (3, 7, [1, 0, 1, 0, 1, 0, 0]),
])
def test_epochs_add_up_to_the_total(total, rounds, expected):
    assert [epochs_in_round(total, rounds, r) for r in range(1, rounds + 1)] == expected
    assert sum(epochs_in_round(total, 30, r) for r in range(1, 31)) == total


def test_round_without_epochs_keeps_the_adapter(monkeypatch):
    config = config_mod.load(None, ["method.name='centralized'", "method.epochs=1", "federation.rounds=3"])
    monkeypatch.setattr(ClientContext, "train", lambda *a, **k: pytest.fail("round 2 of 3 has no epoch to train"))
    examples = [Example(id=str(i), instruction=f"q{i}", output=f"a{i}") for i in range(5)]
    ctx = ClientContext(client="pooled", round=2, examples=examples, state=ClientState(), handle=None, fmt=None,
                        config=config, learning_rate=0.01, seed=0)
    adapter = {"w": torch.tensor([1.0, 2.0])}
    upload = build_method(config).client_update(ctx, adapter).upload
    assert torch.equal(upload.tensors["w"], adapter["w"]) and upload.num_examples == 5
    assert upload.metrics["epochs"] == 0
