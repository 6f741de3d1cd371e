"""A DP-SGD run on the embedded SmolLM2 and real MedQuAD data still learns: at epsilon = 8 the
held-out NLL falls, significantly (paired 95% CI over the held-out examples)."""

from __future__ import annotations

import numpy as np
import pytest

from fedpit import config as config_mod
from fedpit.engines.scoring import reference_nll
from fedpit.engines.training import PrivateSGD, TrainOptions, train_adapter
from fedpit.evaluation.stats import paired_difference
from fedpit.privacy.accounting import calibrate, epsilon
from fedpit.runtimes.local import prepare

# 192 per-example backward passes on SmolLM2: minutes on 2 cores, so a whole run of its own (make test-slow)
pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


def test_dp_sgd_at_epsilon_8_lowers_held_out_nll(data_dir):
    # DP-friendly LoRA: few trainable weights (q and v, rank 4) keep the noise's norm small
    config = config_mod.load("configs/frontier.toml", [
        "privacy.enabled=false", "eval.final_sets=['medquad']", "eval.final_num_examples=32",
        "lora.target_modules=['q_proj','v_proj']", "lora.rank=4", "lora.alpha=8"])
    exp = prepare(config)
    handle, fmt = exp.handle, exp.fmt
    pooled = [e for client in sorted(exp.federation.clients) for e in exp.federation.clients[client]]
    held_out = exp.federation.final_sets["medquad"]
    handle.set_adapter(handle.fresh_adapter(1))
    before = np.array(reference_nll(handle, fmt, held_out, 256, 32))
    batch, epochs, delta = 16, 4, 1e-5
    rate, steps = batch / len(pooled), epochs * -(-len(pooled) // batch)
    sigma = calibrate(8.0, delta, rate, steps, "rdp", "test")
    result = train_adapter(handle, fmt, pooled, TrainOptions(batch_size=batch, learning_rate=5e-3, epochs=epochs,
                                                             max_length=256),
                           seed=0, private=PrivateSGD(noise_multiplier=sigma, max_grad_norm=1.0, seed=2026))
    assert result.steps == steps and 7.5 <= epsilon([(sigma, rate, steps)], delta) <= 8.0
    after = np.array(reference_nll(handle, fmt, held_out, 256, 32))
    difference = paired_difference((after - before)[None, :])
    assert difference.significant and difference.mean < 0, difference.describe()
