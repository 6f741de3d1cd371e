"""Client-level DP (DP-FedAvg) in the shared server loop: the clipped uniform mean and its noise
against an independent numpy computation, the wrapper around mean-aggregating methods (FedAvg,
FedOPT), refusal of the methods it cannot wrap, and the accountant across a kill and resume."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedpit import config as config_mod
from fedpit.config import ClientDPConfig
from fedpit.errors import ConfigError
from fedpit.privacy.accounting import epsilon
from fedpit.privacy.client_dp import ClientLevelDP
from fedpit.runs import RunDir
from fedpit.runtimes.local import open_run, prepare, run_experiment
from fedpit.types import ClientUpload


def uploads_around(global_adapter, scales, sizes):
    generator = torch.Generator().manual_seed(0)
    return [ClientUpload(client=f"c{i}", num_examples=n, tensors={
        k: v + s * torch.randn(v.shape, generator=generator) for k, v in global_adapter.items()})
        for i, (s, n) in enumerate(zip(scales, sizes))]


def numpy_clipped_mean(global_adapter, uploads, bound, sampled):
    keys = list(global_adapter)
    flat_global = np.concatenate([global_adapter[k].numpy().ravel() for k in keys]).astype(np.float64)
    total = np.zeros_like(flat_global)
    for u in uploads:
        delta = np.concatenate([u.tensors[k].numpy().ravel() for k in keys]).astype(np.float64) - flat_global
        total += delta * min(1.0, bound / np.linalg.norm(delta))
    return flat_global + total / sampled


def flat(adapter):
    return np.concatenate([t.numpy().ravel() for t in adapter.values()]).astype(np.float64)


GLOBAL = {"a": torch.randn(40, 30, generator=torch.Generator().manual_seed(1)), "b": torch.zeros(30, 50)}


def test_noised_mean_clips_each_update_and_ignores_example_counts():
    uploads = uploads_around(GLOBAL, scales=[0.001, 0.05, 0.2], sizes=[10, 1000, 3])
    dp = ClientLevelDP(dp=ClientDPConfig(enabled=True, noise_multiplier=1e-12, clip_norm=0.5), noise=1e-12, rate=1.0,
                       secret=b"s")
    mean, figures = dp.noised_mean(GLOBAL, uploads, sampled=3, round_num=1)
    np.testing.assert_allclose(flat(mean.tensors), numpy_clipped_mean(GLOBAL, uploads, 0.5, 3), rtol=0, atol=1e-6)
    assert figures["clipped"] == pytest.approx(2 / 3)  # the two larger updates were cut to the bound
    assert mean.num_examples == 1


def test_noise_has_std_z_s_over_m_and_comes_from_the_secret():
    uploads = uploads_around(GLOBAL, scales=[0.01, 0.01], sizes=[5, 5])
    settings = ClientDPConfig(enabled=True, noise_multiplier=2.0, clip_norm=0.3)
    dp = ClientLevelDP(dp=settings, noise=2.0, rate=1.0, secret=b"server secret")
    mean, _ = dp.noised_mean(GLOBAL, uploads, sampled=4, round_num=3)  # 4 sampled, 2 replied: still / 4
    residual = flat(mean.tensors) - numpy_clipped_mean(GLOBAL, uploads, 0.3, 4)
    assert abs(residual.std() / (2.0 * 0.3 / 4) - 1) < 0.05 and abs(residual.mean()) < 0.01
    again, _ = dp.noised_mean(GLOBAL, uploads, sampled=4, round_num=3)
    other, _ = ClientLevelDP(dp=settings, noise=2.0, rate=1.0, secret=b"another").noised_mean(GLOBAL, uploads, 4, 3)
    np.testing.assert_array_equal(flat(again.tensors), flat(mean.tensors))
    assert not np.allclose(flat(other.tensors), flat(mean.tensors))


def client_dp_overrides(tiny_overrides, *extra):
    return [*tiny_overrides, "privacy.client_dp.enabled=true", "privacy.client_dp.delta=0.1",
            "privacy.client_dp.clip_norm=1000.0", *extra]


@pytest.mark.parametrize("method", ["fedavg", "fedadam", "fedpit"])
def test_the_server_loop_hands_the_method_the_clipped_mean(tiny_overrides, tmp_path, method):
    """With an unreachable clip bound and negligible noise the wrapped server rule sees the uniform mean
    of the uploads: FedAvg's global is that mean, FedAdam steps on it; epsilon is recorded per round."""
    config = config_mod.load(None, client_dp_overrides(tiny_overrides, f"method.name='{method}'",
                                                       "privacy.client_dp.noise_multiplier=1e-9"))
    exp = prepare(config)
    uploads = []
    run = open_run(exp, tmp_path / "run")
    final = run_experiment(exp, run, observer=lambda r, u: uploads.append((r, u)))
    records = [r for r in run.metrics() if r["kind"] == "round"]
    assert [r["client_dp"]["clip_norm"] for r in records] == [1000.0, 1000.0]
    assert records[0]["client_dp"]["clipped"] == 0.0
    assert records[-1]["client_dp"]["epsilon"] > records[0]["client_dp"]["epsilon"] > 0
    if method in ("fedavg", "fedpit"):
        last = [u for r, u in uploads if r == 2]
        uniform = {k: sum(u.tensors[k] for u in last) / len(last) for k in final}
        for key in final:
            torch.testing.assert_close(final[key], uniform[key], rtol=0, atol=1e-5)


def test_epsilon_over_rounds_is_the_accountants(tiny_overrides, tmp_path):
    config = config_mod.load(None, client_dp_overrides(tiny_overrides, "method.name='fedavg'",
                                                       "privacy.client_dp.target_epsilon=3.0",
                                                       "data.partition.num_clients=3",
                                                       "federation.clients_per_round=2"))
    exp = prepare(config)
    run = open_run(exp, tmp_path / "run")
    run_experiment(exp, run)
    records = [r["client_dp"] for r in run.metrics() if r["kind"] == "round"]
    z = records[0]["noise_multiplier"]
    assert records[-1]["epsilon"] == pytest.approx(epsilon([(z, 2 / 3, 2)], 0.1))
    assert 2.9 <= records[-1]["epsilon"] <= 3.0  # calibrated to the target over the run's rounds


@pytest.mark.parametrize("method", ["scaffold", "local", "local_sg", "centralized"])
def test_methods_it_cannot_wrap_are_refused_before_anything_runs(tiny_overrides, method):
    config = config_mod.load(None, client_dp_overrides(tiny_overrides, f"method.name='{method}'",
                                                       "privacy.client_dp.noise_multiplier=1.0"))
    with pytest.raises(ConfigError, match=f"cannot wrap method '{method}'"):
        prepare(config)


def test_delta_must_be_below_one_over_the_number_of_clients(tiny_overrides):
    config = config_mod.load(None, [*client_dp_overrides(tiny_overrides, "privacy.client_dp.noise_multiplier=1.0"),
                                    "privacy.client_dp.delta=0.5"])
    with pytest.raises(ConfigError, match="not below 1/N for N=3 clients"):
        prepare(config)


def test_killed_and_resumed_run_keeps_the_server_accountant(tiny_overrides, tmp_path):
    overrides = client_dp_overrides(tiny_overrides, "method.name='fedavg'", "privacy.client_dp.noise_multiplier=0.8",
                                    "federation.rounds=3")
    (tmp_path / "empty.toml").write_text("")
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "fedpit.cli", "run", str(tmp_path / "empty.toml"), "--quiet", "--out", str(out),
            *[a for o in overrides for a in ("--set", o)]]
    killed = subprocess.run(args, env={**os.environ, "FEDPIT_FAILPOINT": "round_start:3"}, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "FEDPIT_FAILPOINT"}
    resumed = subprocess.run([sys.executable, "-m", "fedpit.cli", "run", "--quiet", "--resume", str(out)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [r for r in RunDir(out).metrics() if r["kind"] == "round"]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[-1]["client_dp"]["epsilon"] == pytest.approx(epsilon([(0.8, 1.0, 3)], 0.1), rel=1e-12)
