"""Record-level DP-SGD, checked against computations that share no code with it: per-example
gradients from torch.func on the unpadded model (HF's own loss), the exact (epsilon, delta) of the
Gaussian mechanism (Balle & Wang 2018) for the accountants, and runs of every method."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedpit import config as config_mod
from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.training import PrivateSGD, TrainOptions, train_adapter
from fedpit.errors import ConfigError
from fedpit.methods import METHODS
from fedpit.model import load_model
from fedpit.privacy.accounting import calibrate, epsilon
from fedpit.privacy.dp import noise_multiplier
from fedpit.prompts import AlpacaFormat
from fedpit.runs import RunDir
from fedpit.runtimes.local import open_run, prepare, run_experiment
from fedpit.types import Example

FMT = AlpacaFormat()
EXAMPLES = [Example(id=str(i), instruction=f"Name the code of patient {i}",
                    output=f"Patient {i} has code {1000 + 37 * i}" + " and more" * (i % 3)) for i in range(8)]


@pytest.fixture
def handle(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", max_length=64),
                        LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    start = handle.fresh_adapter(0)
    generator = torch.Generator().manual_seed(3)
    handle.set_adapter({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in start.items()})
    return handle


def per_example_gradients(handle) -> list[torch.Tensor]:
    """Each example's gradient of its mean token loss, flat over every LoRA tensor, from torch.func on
    the example alone (no padding, transformers' own loss): independent of fedpit's training loop."""
    from torch.func import functional_call, grad

    names = {n.replace(".default.", "."): n for n, p in handle.model.named_parameters() if p.requires_grad}
    lora = {names[k]: p.detach() for k, p in handle.lora_params.items()}
    flat = []
    for ex in EXAMPLES:
        prompt = handle.tokenizer(FMT.render(ex.instruction, ex.input))["input_ids"]
        target = handle.tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [handle.tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])

        def loss(params, ids=ids, labels=labels):
            return functional_call(handle.model, params, args=(), kwargs={"input_ids": ids, "labels": labels}).loss

        g = grad(loss)(lora)
        flat.append(torch.cat([g[names[k]].flatten() for k in handle.lora_params]))
    return flat


def dp_step_gradient(handle, private: PrivateSGD, batch_size: int):
    """The gradient fedpit's DP step applied (one step), flat, and the rows it sampled."""
    start = handle.get_adapter()
    result = train_adapter(handle, FMT, EXAMPLES, TrainOptions(batch_size=batch_size, learning_rate=1e-9,
                                                                max_length=64, max_steps=1),
                           seed=0, private=private, record_gradient=True)
    handle.set_adapter(start)
    return torch.cat([result.gradient_mean[k].flatten() for k in handle.lora_params]), result


def clipped_mean(grads: list[torch.Tensor], rows: list[int], bound: float, expected: float) -> torch.Tensor:
    return sum(grads[i] * min(1.0, bound / float(grads[i].norm())) for i in rows) / expected


def test_without_noise_and_clipping_a_dp_step_is_the_mean_of_per_example_gradients(handle):
    grads = per_example_gradients(handle)
    got, result = dp_step_gradient(handle, PrivateSGD(noise_multiplier=0.0, max_grad_norm=1e6, seed=5), 8)
    assert result.sample_rate == 1.0 and result.batches == [list(range(8))]
    torch.testing.assert_close(got, torch.stack(grads).mean(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("quantile", [0.0, 0.5])
def test_every_example_is_clipped_to_the_bound(handle, quantile):
    grads = per_example_gradients(handle)
    norms = sorted(float(g.norm()) for g in grads)
    bound = norms[0] * 0.5 if quantile == 0.0 else norms[len(norms) // 2]  # all clipped, or half of them
    got, result = dp_step_gradient(handle, PrivateSGD(noise_multiplier=0.0, max_grad_norm=bound, seed=5), 4)
    rows = result.batches[0]
    assert result.sample_rate == 0.5
    # the sum of clipped gradients over the *expected* batch size (q * n = 4), whatever size was drawn
    torch.testing.assert_close(got, clipped_mean(grads, rows, bound, 4.0), rtol=1e-4, atol=1e-7)
    if quantile == 0.0:
        assert rows, "seed 5 draws a non-empty batch"
        contributions = [grads[i] * bound / float(grads[i].norm()) for i in rows]
        assert all(abs(float(c.norm()) - bound) < 1e-6 for c in contributions)


def test_the_noise_has_std_sigma_c_over_b(handle):
    grads = per_example_gradients(handle)
    sigma, bound, batch = 3.0, 0.02, 4
    got, result = dp_step_gradient(handle, PrivateSGD(noise_multiplier=sigma, max_grad_norm=bound, seed=11), batch)
    residual = (got - clipped_mean(grads, result.batches[0], bound, batch)).numpy()
    expected = sigma * bound / batch
    assert residual.size > 800
    assert abs(residual.std() / expected - 1) < 0.1
    assert abs(residual.mean()) < 4 * expected / math.sqrt(residual.size)
    again, _ = dp_step_gradient(handle, PrivateSGD(noise_multiplier=sigma, max_grad_norm=bound, seed=11), batch)
    other, _ = dp_step_gradient(handle, PrivateSGD(noise_multiplier=sigma, max_grad_norm=bound, seed=12), batch)
    torch.testing.assert_close(again, got)  # the same secret seed draws the same noise and batch
    assert not torch.allclose(other, got)


def test_poisson_batches_sample_every_example_at_the_rate(handle):
    result = train_adapter(handle, FMT, EXAMPLES, TrainOptions(batch_size=2, learning_rate=1e-9, epochs=25,
                                                                max_length=64),
                           seed=0, private=PrivateSGD(noise_multiplier=1.0, max_grad_norm=1.0, seed=7))
    assert result.steps == 100 and result.sample_rate == 0.25
    sizes = [len(b) for b in result.batches]
    assert 0 in sizes or min(sizes) < 2 < max(sizes), "batch sizes vary"
    assert abs(np.mean(sizes) - 2.0) < 0.35  # binomial(8, 0.25): mean 2, sd of the mean ~0.12


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Tight (epsilon, delta) of `steps` Gaussian mechanisms of noise `sigma` without subsampling: their
    composition is one Gaussian mechanism with mu = sqrt(steps) / sigma (Balle & Wang 2018, Thm. 8)."""
    mu = math.sqrt(steps) / sigma

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 1e-6, 100.0)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 4), (2.0, 20), (0.7, 2)])
def test_accountants_against_the_exact_gaussian_mechanism(sigma, steps):
    exact = exact_gaussian_epsilon(sigma, steps, 1e-5)
    prv = epsilon([(sigma, 1.0, steps)], 1e-5, "prv")
    rdp = epsilon([(sigma, 1.0, steps)], 1e-5, "rdp")
    assert abs(prv - exact) / exact < 0.02
    assert exact <= rdp < 1.5 * exact  # RDP is a valid, looser bound


def test_subsampling_spends_less_and_calibration_reaches_the_target():
    assert epsilon([(1.0, 0.25, 8)], 1e-5) < epsilon([(1.0, 1.0, 8)], 1e-5)
    assert epsilon([], 1e-5) == 0.0
    sigma = calibrate(4.0, 1e-5, 0.5, 6, "rdp", "test")
    assert 3.9 <= epsilon([(sigma, 0.5, 6)], 1e-5) <= 4.0
    assert epsilon([(sigma * 1.2, 0.5, 6)], 1e-5) < 3.9


def dp_config(tiny_overrides, *extra):
    return config_mod.load(None, [*tiny_overrides, "privacy.dp.enabled=true", "privacy.dp.target_epsilon=4",
                                  "privacy.dp.delta=1e-3", *extra])


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_under_dp_reaches_the_target_and_uploads_no_loss(name, tmp_path, tiny_overrides):
    """Every method runs under DP-SGD: each client reports epsilon after each round, the last one at
    (not above) the target, and no training loss leaves a client."""
    config = dp_config(tiny_overrides, f"method.name='{name}'", "method.centralized.epochs=2", "model.threads=1")
    exp = prepare(config)
    run = RunDir.create(tmp_path / name, config)
    uploads = []
    run_experiment(exp, run, observer=lambda r, u: uploads.append((r, u)))
    for _, upload in uploads:
        assert not any(k.startswith("train_loss") for k in upload.metrics)
        assert upload.metrics["dp_delta"] == 1e-3
    last = [u for r, u in uploads if r == config.federation.rounds]
    assert last and all(3.6 <= u.metrics["dp_epsilon"] <= 4.0 * 1.005 for u in last), \
        [u.metrics["dp_epsilon"] for u in last]
    first = [u.metrics["dp_epsilon"] for r, u in uploads if r == 1]
    assert all(0 < e < 4.0 for e in first), "epsilon accumulates over rounds"


@pytest.mark.parametrize("failpoint", ["train_step:4", "after_client_update:4"])
def test_killed_and_resumed_dp_run_reports_the_same_epsilon(tmp_path, tiny_overrides, failpoint):
    """The accountant is client state, versioned by round: a run killed mid-training (or after one
    client of round 2 finished) and resumed reports each client's epsilon exactly as an uninterrupted
    run does, and keeps the client's secret."""
    overrides = [*tiny_overrides, "method.name='fedavg'", "privacy.dp.enabled=true", "privacy.dp.target_epsilon=4",
                 "privacy.dp.delta=1e-3"]
    exp = prepare(config_mod.load(None, overrides))
    straight = open_run(exp, tmp_path / "straight")
    run_experiment(exp, straight)
    out = tmp_path / "killed"
    (tmp_path / "empty.toml").write_text("")
    env = {**os.environ, "FEDPIT_FAILPOINT": failpoint}
    args = [sys.executable, "-m", "fedpit.cli", "run", str(tmp_path / "empty.toml"), "--quiet", "--out", str(out),
            *[a for o in overrides for a in ("--set", o)]]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    secret = (out / "clients" / "client-00" / "dp-secret").read_bytes()
    env.pop("FEDPIT_FAILPOINT")
    resumed = subprocess.run([sys.executable, "-m", "fedpit.cli", "run", "--quiet", "--resume", str(out)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "clients" / "client-00" / "dp-secret").read_bytes() == secret

    def final_epsilons(path):
        rounds = [r for r in RunDir(path).metrics() if r["kind"] == "round"]
        assert [r["round"] for r in rounds] == [1, 2]
        return {c: f["dp_epsilon"] for c, f in rounds[-1]["clients"].items()}

    assert final_epsilons(out) == pytest.approx(final_epsilons(straight.path), rel=1e-12)


@pytest.mark.parametrize(("overrides", "message"), [
    (["privacy.dp.delta=0.1"], "not below 1/n for client"),
    (["privacy.dp.target_epsilon=1e-4"], "cannot be reached"),
])
def test_bad_dp_settings_fail_before_a_run_exists(tiny_overrides, overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(dp_config(tiny_overrides, *overrides))


def test_dp_on_a_method_that_trains_on_no_private_data_is_refused(tiny_overrides):
    config = dp_config(tiny_overrides)
    with pytest.raises(ConfigError, match="trains on no private data"):
        noise_multiplier(config, [[], []], "client-00", 12)


def test_what_dp_covers_is_said_per_method_and_demonstration_source(tiny_overrides, tmp_path, write_instruction_file):
    """FedPIT under DP-SGD with the paper's private demonstrations: epsilon covers W_l only, and the page
    says the upload has no guarantee; with public demonstrations it covers the upload. FedAvg: always."""
    from fedpit.report import COVERS_RECORD, COVERS_RECORD_SYNTHETIC, dp_summary, write_report

    public = write_instruction_file(tmp_path / "public.jsonl", 8, prefix="Public ")
    pages = {}
    for label, extra in {"fedpit-private": ["method.name='fedpit'"],
                         "fedpit-public": ["method.name='fedpit'", "synth.demonstrations='public'",
                                           f"synth.public_file='{public}'"],
                         "fedavg": ["method.name='fedavg'"]}.items():
        config = dp_config(tiny_overrides, *extra, "federation.rounds=1")
        exp = prepare(config)
        run = open_run(exp, tmp_path / label)
        run_experiment(exp, run)
        summary = dp_summary(run.metrics(), config)["record"]
        pages[label] = (summary, write_report(run.path).read_text())
        if label == "fedpit-public":
            demos = [json.loads(line) for line in next((run.path / "clients").glob("*/synthetic/*.jsonl"))
                     .read_text().splitlines()]
            assert demos and all(d.startswith("public/") for s in demos
                                 for d in s["instruction_demo_ids"] + s["response_demo_ids"])
    assert pages["fedpit-private"][0]["covers"] == COVERS_RECORD_SYNTHETIC
    assert not pages["fedpit-private"][0]["covers_upload"] and "NO formal guarantee" in pages["fedpit-private"][1]
    assert pages["fedpit-public"][0]["covers"] == COVERS_RECORD and pages["fedpit-public"][0]["covers_upload"]
    assert pages["fedavg"][0]["covers"] == COVERS_RECORD
    assert "## Differential privacy" in pages["fedavg"][1] and "epsilon = " in pages["fedavg"][1]


def test_a_batch_checks_every_rows_dp_settings_before_the_first_trains(tiny_overrides, tmp_path, capsys):
    """`fedpit compare` with a delta that is too large for the DP row's clients: one error line, and not even
    the first (non-DP) row has trained."""
    from fedpit.cli import main

    (tmp_path / "empty.toml").write_text("")
    out = tmp_path / "compare"
    argv = ["compare", str(tmp_path / "empty.toml"), "--methods", "fedavg", "--quiet", "--out", str(out),
            "--variant", "dp:method.name='fedavg';privacy.dp.enabled=true;privacy.dp.target_epsilon=4;"
                         "privacy.dp.delta=0.5", *[a for o in tiny_overrides for a in ("--set", o)]]
    assert main(argv) == 2
    assert "not below 1/n for client" in capsys.readouterr().err
    assert not out.exists()
