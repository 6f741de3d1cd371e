"""FedProx, LocIT, Centralized and FedMIT on the tiny model."""

from __future__ import annotations

import pytest
import torch

from fedpit import config as config_mod
from fedpit.methods import ClientContext, build_method
from fedpit.runtimes.local import prepare
from fedpit.types import ClientState


@pytest.fixture
def base_overrides(tiny_overrides):
    return [*tiny_overrides, "model.threads=1"]


def _ctx(exp, config, client="client-00"):
    return ClientContext(client=client, round=1, examples=exp.federation.clients[client], state=ClientState(),
                         handle=exp.handle, fmt=exp.fmt, config=config, learning_rate=0.05, seed=3)


def _distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a)


def test_fedprox_mu_zero_equals_fedavg_and_mu_pulls_towards_global(base_overrides):
    fedavg_cfg = config_mod.load(None, [*base_overrides, "method.name='fedavg'"])
    exp = prepare(fedavg_cfg)
    start = exp.handle.fresh_adapter(0)
    fedavg = build_method(fedavg_cfg).client_update(_ctx(exp, fedavg_cfg), start).upload.tensors
    prox0_cfg = config_mod.load(None, [*base_overrides, "method.name='fedprox'", "method.mu=0.0"])
    prox0 = build_method(prox0_cfg).client_update(_ctx(exp, prox0_cfg), start).upload.tensors
    assert all(torch.equal(fedavg[k], prox0[k]) for k in fedavg)
    prox_cfg = config_mod.load(None, [*base_overrides, "method.name='fedprox'", "method.mu=50.0"])
    prox = build_method(prox_cfg).client_update(_ctx(exp, prox_cfg), start).upload.tensors
    assert _distance(prox, start) < _distance(fedavg, start)


def test_local_uploads_nothing_and_global_stays(base_overrides):
    config = config_mod.load(None, [*base_overrides, "method.name='local'"])
    exp = prepare(config)
    method = build_method(config)
    start = exp.handle.fresh_adapter(0)
    result = method.client_update(_ctx(exp, config), start)
    assert result.upload.tensors == {} and result.upload.num_bytes == 0
    assert "private" in result.state.tensors
    assert method.aggregate(start, [result.upload], {}) is start


def test_centralized_sees_every_example(base_overrides):
    fed_cfg = config_mod.load(None, [*base_overrides, "method.name='fedavg'"])
    everyone = sorted(e.id for examples in prepare(fed_cfg).federation.clients.values() for e in examples)
    config = config_mod.load(None, [*base_overrides, "method.name='centralized'", "method.epochs=2"])
    exp = prepare(config)
    assert list(exp.federation.clients) == ["pooled"]
    assert sorted(e.id for e in exp.federation.clients["pooled"]) == everyone


def test_fedmit_trains_one_uploaded_adapter_on_mixed_data(base_overrides, monkeypatch):
    trained = {}
    original = ClientContext.train

    def spy(self, start, examples, purpose, **kwargs):
        adapter, result = original(self, start, examples, purpose, **kwargs)
        trained[purpose] = (adapter, [e.id for e in examples])
        return adapter, result

    monkeypatch.setattr(ClientContext, "train", spy)
    config = config_mod.load(None, [*base_overrides, "method.name='fedmit'", "method.keep=2"])
    exp = prepare(config)
    result = build_method(config).client_update(_ctx(exp, config), exp.handle.fresh_adapter(0))
    mixed, ids = trained["mixed"]
    assert all(torch.equal(result.upload.tensors[k], mixed[k]) for k in mixed)
    private_ids = {e.id for e in exp.federation.clients["client-00"]}
    synthetic = [i for i in ids if i.startswith("synth-")]
    assert private_ids <= set(ids) and len(synthetic) == sum(s.selected for s in result.synthetic)
