"""SCAFFOLD: the variate updates by hand, the zero-valued correction term, the data gradients
the training loop records (tests/engines), and a client round on the tiny model (zero variates
reproduce FedAvg exactly)."""

from __future__ import annotations

import pytest
import torch

from fedpit import config as config_mod
from fedpit.errors import ConfigError
from fedpit.methods import ClientContext, build_method
from fedpit.methods.scaffold import (
    DELTA,
    control_update,
    correction_term,
    server_control_update,
)
from fedpit.runtimes.local import prepare
from fedpit.types import ClientState, ClientUpload


def test_control_variate_updates_by_hand():
    c_i, c = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}
    x, y = {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}
    # c_i+ = 1 - 0.5 + (2 - 1) / (4 * 0.25) = 1.5
    assert torch.allclose(control_update(c_i, c, x, y, steps=4, lr=0.25)["w"], torch.tensor([1.5]))
    deltas = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    # c += (|S| / N) * mean(delta) = (2 / 10) * 2 = 0.4
    assert torch.allclose(server_control_update(c, deltas, num_clients=10)["w"], torch.tensor([0.9]))


def test_correction_term_is_zero_valued_with_the_correction_as_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    correction = {"w": torch.tensor([0.5, 3.0])}
    term = correction_term(correction)({"w": w})
    assert term.item() == 0.0
    term.backward()
    assert torch.equal(w.grad, correction["w"])


def test_unknown_variate_is_a_config_error():
    with pytest.raises(ConfigError, match="method.variate"):
        build_method(config_mod.load(None, ["method.name='scaffold'", "method.variate='adam'"]))


def test_scaffold_round_keeps_client_variate_private(tiny_overrides):
    overrides = [*tiny_overrides, "model.threads=1"]
    config = config_mod.load(None, [*overrides, "method.name='scaffold'"])
    exp = prepare(config)
    method = build_method(config)
    global_adapter = exp.handle.fresh_adapter(0)

    def context(cfg, state):
        return ClientContext(client="client-00", round=1, examples=exp.federation.clients["client-00"], state=state,
                             handle=exp.handle, fmt=exp.fmt, config=cfg, learning_rate=0.01, seed=1)

    result = method.client_update(context(config, ClientState()), global_adapter)
    fedavg_config = config_mod.load(None, [*overrides, "method.name='fedavg'"])
    fedavg = build_method(fedavg_config).client_update(context(fedavg_config, ClientState()), global_adapter)
    assert all(torch.equal(result.upload.tensors[k], fedavg.upload.tensors[k]) for k in global_adapter), \
        "with zero variates the correction is zero and SCAFFOLD is FedAvg"
    assert result.upload.metrics["train_loss_private"] == fedavg.upload.metrics["train_loss_private"]
    c_i = result.state.tensors["scaffold_c"]
    assert set(c_i) == set(global_adapter) and any(c_i[k].abs().sum() > 0 for k in c_i)
    delta = result.upload.extras[DELTA]
    assert all(torch.equal(delta[k], c_i[k]) for k in delta)  # c_i started at 0
    server_state = {"num_clients": 3}
    other = ClientUpload("b", result.upload.tensors, 1, extras={DELTA: delta})
    method.aggregate(global_adapter, [result.upload, other], server_state)
    assert all(torch.allclose(server_state["c"][k], 2 * delta[k] / 3) for k in delta)
    assert set(method.broadcast(server_state)) == {"c"}
