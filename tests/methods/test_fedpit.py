"""FedPIT's client rule on the tiny model: the upload is exactly beta*W_l + (1-beta)*W_s, and
beta = 1 reproduces FedAvg's upload."""

from __future__ import annotations

import pytest
import torch

from fedpit import config as config_mod
from fedpit.errors import ConfigError
from fedpit.methods import ClientContext, build_method
from fedpit.methods.aggregation import mix
from fedpit.runtimes.local import prepare
from fedpit.types import ClientState


@pytest.fixture
def experiment(tiny_overrides):
    return prepare(config_mod.load(None, [*tiny_overrides, "model.threads=1"]))


def _context(exp, config, client="client-00", state=None):
    return ClientContext(client=client, round=1, examples=exp.federation.clients[client], state=state or ClientState(),
                         handle=exp.handle, fmt=exp.fmt, config=config, learning_rate=0.01, seed=123)


def _capture_training(monkeypatch):
    trained = {}
    original = ClientContext.train

    def spy(self, start, examples, purpose, **kwargs):
        adapter, result = original(self, start, examples, purpose, **kwargs)
        trained[purpose] = adapter
        return adapter, result

    monkeypatch.setattr(ClientContext, "train", spy)
    return trained


def test_upload_is_exact_mix_of_private_and_synthetic(experiment, monkeypatch):
    trained = _capture_training(monkeypatch)
    config = config_mod.replace(experiment.config, **{"method.beta": 0.3})
    method = build_method(config)
    global_adapter = experiment.handle.get_adapter()
    result = method.client_update(_context(experiment, config), global_adapter)
    assert "private" in trained and "synthetic" in trained, "both adapters are trained"
    expected = mix(trained["private"], trained["synthetic"], 0.3)
    assert all(torch.equal(result.upload.tensors[k], expected[k]) for k in expected)
    assert not all(torch.equal(result.upload.tensors[k], trained["private"][k]) for k in expected)
    kept = [s for s in result.synthetic if s.selected]
    assert len(kept) == min(config.method.options_for("fedpit")["keep"], len(result.synthetic))
    assert all(s.ifs is not None for s in result.synthetic)
    assert max(s.ifs for s in kept) <= min((s.ifs for s in result.synthetic if not s.selected), default=float("inf"))


def test_beta_one_reproduces_fedavg(experiment):
    global_adapter = experiment.handle.get_adapter()
    fedpit_config = config_mod.replace(experiment.config, **{"method.beta": 1.0})
    fedpit_method = build_method(fedpit_config)
    fedpit_upload = fedpit_method.client_update(_context(experiment, fedpit_config), global_adapter).upload
    fedavg_config = config_mod.from_dict({**config_mod.to_dict(experiment.config), "method": {"name": "fedavg"}})
    fedavg_method = build_method(fedavg_config)
    fedavg_upload = fedavg_method.client_update(_context(experiment, fedavg_config), global_adapter).upload
    assert all(torch.equal(fedpit_upload.tensors[k], fedavg_upload.tensors[k]) for k in global_adapter)
    assert fedpit_upload.num_examples == fedavg_upload.num_examples


def test_persistent_private_adapter_stays_on_client(experiment):
    config = config_mod.replace(experiment.config, **{"method.persistent_private": True})
    global_adapter = experiment.handle.get_adapter()
    result = build_method(config).client_update(_context(experiment, config), global_adapter)
    private = result.state.tensors["private"]
    assert set(private) == set(global_adapter)
    assert not all(torch.equal(result.upload.tensors[k], private[k]) for k in private)


def test_augmented_local_trains_on_private_plus_synthetic(experiment, monkeypatch):
    trained = _capture_training(monkeypatch)
    config = config_mod.replace(experiment.config, **{"method.augmented_local": True})
    build_method(config).client_update(_context(experiment, config), experiment.handle.get_adapter())
    assert {"private", "augmented", "synthetic"} <= set(trained)


@pytest.mark.parametrize("override, message", [("method.beta=1.5", "method.beta"), ("method.keep=0", "method.keep"),
                                              ("method.betta=0.5", "did you mean 'beta'")])
def test_bad_method_options_are_clear(override, message):
    config = config_mod.load(None, [override])
    with pytest.raises(ConfigError, match=message):
        build_method(config)
