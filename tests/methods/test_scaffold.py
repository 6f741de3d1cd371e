from __future__ import annotations

import torch

from fedpit import config as config_mod
from fedpit.methods import ClientContext, build_method
from fedpit.methods.scaffold import DELTA, control_update, server_control_update
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


def test_scaffold_round_keeps_client_variate_private(tiny_overrides):
    config = config_mod.load(None, [*tiny_overrides, "method.name='scaffold'", "model.threads=1"])
    exp = prepare(config)
    method = build_method(config)
    global_adapter = exp.handle.fresh_adapter(0)
    state = ClientState()
    ctx = ClientContext(client="client-00", round=1, examples=exp.federation.clients["client-00"], state=state,
                        handle=exp.handle, fmt=exp.fmt, config=config, learning_rate=0.01, seed=1)
    result = method.client_update(ctx, global_adapter)
    assert "scaffold_c" in result.state.tensors
    delta = result.upload.extras[DELTA]
    assert all(torch.equal(delta[k], result.state.tensors["scaffold_c"][k]) for k in delta)  # c_i started at 0
    server_state = {"num_clients": 3}
    other = ClientUpload("b", result.upload.tensors, 1, extras={DELTA: delta})
    method.aggregate(global_adapter, [result.upload, other], server_state)
    assert set(server_state["c"]) == set(global_adapter)
    assert set(method.broadcast(server_state)) == {"c"}
