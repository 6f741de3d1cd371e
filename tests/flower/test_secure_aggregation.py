"""SecAgg+ on Flower's simulation engine: the server receives masked vectors only, the secure mean
equals the plain weighted mean within the stated quantisation bound, client-level DP composes with
it, and what cannot work under it is refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from safetensors.torch import load_file

from fedpit import config as config_mod
from fedpit.errors import ConfigError, FedpitError
from fedpit.runs import RunDir
from fedpit.runtimes.flower import server_app
from fedpit.runtimes.flower.simulation import run_simulation

# three clients of unequal size (9, 5, 22 examples), so a wrong weighting shows
SECURE = ["data.partition.kind='dirichlet'", "data.partition.alpha=0.5", "federation.rounds=1",
          "method.name='fedavg'", "federation.reply_timeout=300"]


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _received(monkeypatch) -> list:
    """Every message the ServerApp pulls from the SuperLink, whatever code asked for it."""
    seen = []
    original = InMemoryGrid.pull_messages

    def pull(self, message_ids):
        replies = list(original(self, message_ids))
        seen.extend(replies)
        return replies

    monkeypatch.setattr(InMemoryGrid, "pull_messages", pull)
    return seen


def _uploads(monkeypatch) -> list:
    seen = []
    original = server_app.codec.decode_reply

    def decode(content):
        report = original(content)
        seen.append(report.upload)
        return report

    monkeypatch.setattr(server_app.codec, "decode_reply", decode)
    return seen


def _flat(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([tensors[k].double().flatten().numpy() for k in sorted(tensors)])


def _visible_uploads(replies, uploads) -> list[str]:
    """Clients whose upload can be read off a reply: a float array matching it, or a vector (float or
    integer) that correlates with it. A masked vector is uniform noise mod 2**32 and does not."""
    found = []
    for reply in replies:
        if reply.has_error():
            continue
        arrays = [a.numpy() for record in reply.content.array_records.values() for a in record.values()]
        for record in reply.content.config_records.values():
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                for item in items:
                    if isinstance(item, bytes):
                        try:
                            arrays.append(bytes_to_ndarray(item))
                        except Exception:  # keys, shares and ciphertexts are not arrays
                            continue
        numeric = np.concatenate([a.astype(np.float64).ravel() for a in arrays if a.size > 1]) if arrays else None
        for upload in uploads:
            target = _flat(upload.tensors)
            if numeric is None or numeric.size < target.size:
                continue
            for start in range(0, numeric.size - target.size + 1, target.size):
                window = numeric[start:start + target.size]
                if np.std(window) > 0 and abs(np.corrcoef(window, target)[0, 1]) > 0.2:
                    found.append(upload.client)
    return sorted(set(found))


def test_the_server_sees_only_the_aggregate_and_it_equals_the_weighted_mean(tmp_path, tiny_overrides, monkeypatch):
    config = config_mod.load(None, [*tiny_overrides, *SECURE])
    uploads = _uploads(monkeypatch)
    plain_replies = _received(monkeypatch)
    plain = run_simulation(config, tmp_path / "plain")
    assert len(uploads) == 3 and sorted(u.num_examples for u in uploads) == [5, 9, 22]
    # the check below can fail: without secure aggregation every upload is in plain sight
    assert _visible_uploads(plain_replies, uploads) == sorted(u.client for u in uploads)

    secure_config = config_mod.replace(config, **{"flower.secure_aggregation": True})
    received = _received(monkeypatch)
    uploads_before = len(uploads)
    secure = run_simulation(secure_config, tmp_path / "secure")
    assert len(uploads) == uploads_before, "no plain reply was decoded in the secure run"
    assert received and _visible_uploads(received, uploads) == []
    assert all(not record for r in received if not r.has_error() for record in r.content.array_records.values())

    total = sum(u.num_examples for u in uploads)
    exact = {k: sum(u.tensors[k].double() * u.num_examples for u in uploads) / total for k in uploads[0].tensors}
    record = next(r for r in RunDir(secure).metrics() if r["kind"] == "round")
    secagg = record["secure_aggregation"]
    # the bound by hand: K * 3c / (Q * sum of quantised weights n_k / max n)
    q = config.flower.secagg_quantization_range
    weights = sum(round(u.num_examples / 22 * q) for u in uploads) / q
    bound = 3 * 3 * config.flower.secagg_clipping_range / (q * weights)
    assert secagg["contributors"] == 3 and secagg["error_bound"] == pytest.approx(bound)
    got = _adapter(secure)
    worst = max(float((got[k].double() - exact[k]).abs().max()) for k in exact)
    assert worst <= bound, (worst, bound)
    unweighted = {k: sum(u.tensors[k].double() for u in uploads) / 3 for k in exact}
    assert max(float((unweighted[k] - exact[k]).abs().max()) for k in exact) > 10 * bound, "weights matter here"
    plain_adapter = _adapter(plain)
    assert max(float((plain_adapter[k].double() - got[k].double()).abs().max()) for k in exact) <= bound + 1e-6
    assert set(record["clients"]) == {u.client for u in uploads}
    assert not any(k.startswith("train_loss") for c in record["clients"].values() for k in c)
    assert secagg["bytes_received"] > 0 and all(c["upload_bytes"] > 0 for c in record["clients"].values())


def test_client_level_dp_composes_with_secure_aggregation(tmp_path, tiny_overrides):
    """Each client clips its own update; the server noises the securely summed clipped updates. With
    almost no noise, the result is the plain DP-FedAvg round's within the quantisation bound, and both
    spend the same epsilon."""
    dp = ["privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1e-9", "privacy.client_dp.delta=0.1",
          "privacy.client_dp.clip_norm=0.01"]
    config = config_mod.load(None, [*tiny_overrides, *SECURE, *dp])
    plain = run_simulation(config, tmp_path / "plain")
    secure = run_simulation(config_mod.replace(config, **{"flower.secure_aggregation": True}), tmp_path / "secure")
    rounds = {name: next(r for r in RunDir(run).metrics() if r["kind"] == "round")
              for name, run in (("plain", plain), ("secure", secure))}
    assert rounds["secure"]["client_dp"]["epsilon"] == rounds["plain"]["client_dp"]["epsilon"]
    assert rounds["secure"]["client_dp"]["clipped"] == rounds["plain"]["client_dp"]["clipped"] == 1.0
    bound = rounds["secure"]["secure_aggregation"]["error_bound"]
    a, b = _adapter(plain), _adapter(secure)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= bound + 1e-6


def test_what_cannot_run_under_secure_aggregation_is_refused(tmp_path, tiny_overrides):
    from fedpit.runtimes.local import open_run, prepare, run_experiment

    on = [*tiny_overrides, "flower.secure_aggregation=true"]
    with pytest.raises(ConfigError, match="individual uploads"):
        server_app.check_config(config_mod.load(None, [*on, "method.name='scaffold'"]))
    with pytest.raises(FedpitError, match="uploads not visible to the server"):
        server_app.check_config(config_mod.load(None, [*on, "method.name='fedavg'", "privacy.enabled=true"]))
    server_app.check_config(config_mod.load(None, [*on, "method.name='fedpit'"]))  # a mean: accepted
    exp = prepare(config_mod.load(None, [*on, "method.name='fedavg'", "federation.rounds=1"]))
    with pytest.raises(ConfigError, match="--runtime flower-sim"):
        run_experiment(exp, open_run(exp, tmp_path / "local"))
    with pytest.raises(ConfigError, match="lets the server unmask"):
        config_mod.load(None, [*on, "flower.secagg_threshold=0.5"])


def test_an_upload_outside_the_clipping_range_is_refused_not_clipped():
    from fedpit.runtimes.flower.secure import secure_upload
    from fedpit.types import ClientUpload

    config = config_mod.load(None, ["flower.secure_aggregation=true", "flower.secagg_clipping_range=1.0"])
    upload = ClientUpload(client="a", tensors={"w": torch.tensor([0.5, -1.5])}, num_examples=3,
                          metrics={"train_loss_private": 1.0, "synthetic_kept": 2.0})
    with pytest.raises(FedpitError, match="secagg_clipping_range"):
        secure_upload(upload, {"w": torch.zeros(2)}, config)
    inside = ClientUpload(client="a", tensors={"w": torch.tensor([0.5, -0.5])}, num_examples=3,
                          metrics={"train_loss_private": 1.0, "synthetic_kept": 2.0})
    tensors, weight = secure_upload(inside, {"w": torch.zeros(2)}, config)
    assert weight == 3 and torch.equal(tensors["w"], inside.tensors["w"])
    assert inside.metrics == {"synthetic_kept": 2.0}, "training losses stay on the client"
