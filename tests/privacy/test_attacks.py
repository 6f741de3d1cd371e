"""Each attack against a case whose answer is known: a model trained to memorise scores high,
the untuned base model scores low; a canary trained many times is exposed, an unseen one is not;
membership AUC is near 0.5 for random labels."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.training import TrainOptions, train_adapter
from fedpit.model import load_model
from fedpit.privacy import exposure, extraction_attack, make_canaries, membership_attack
from fedpit.privacy.extraction import common_prefix
from fedpit.prompts import AlpacaFormat
from fedpit.types import Example

FMT = AlpacaFormat()


@pytest.fixture(scope="module")
def memorised(tiny_model_dir):
    """The tiny model before and after training many epochs on four short examples."""
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", threads=1),
                        LoraConfig(rank=16, alpha=32, dropout=0.0))
    base = handle.get_adapter()
    phrases = ["alpha beta gamma delta", "river stone cloud maple", "copper violin desert owl",
               "winter garden silver lamp"]
    members = [Example(id=str(i), instruction=f"Recite record {name}", output=phrase)
               for i, (name, phrase) in enumerate(zip(["one", "two", "three", "four"], phrases))]
    canary = make_canaries(["c"], 1, digits=4, seed=1)[0]
    unseen = make_canaries(["c"], 1, digits=4, seed=2)[0]
    training = members + [canary.example(i) for i in range(10)]
    train_adapter(handle, FMT, training, TrainOptions(batch_size=7, learning_rate=0.01, epochs=60, max_length=64),
                  seed=0)
    return handle, base, handle.get_adapter(), members, canary, unseen


def test_memorised_examples_are_extracted(memorised):
    handle, base, tuned, members, _canary, _unseen = memorised
    handle.set_adapter(tuned)
    high = extraction_attack(handle, FMT, members, prefix_tokens=4, max_new_tokens=12)
    handle.set_adapter(base)
    low = extraction_attack(handle, FMT, members, prefix_tokens=4, max_new_tokens=12)
    assert high["memorization_rougeL"] > 0.8 and high["extraction_exact_rate"] == 1.0
    assert low["memorization_rougeL"] < 0.3 and low["extraction_exact_rate"] == 0.0
    assert high["memorization_frac_above_0.9"] >= 0.75


def test_trained_canary_is_exposed_unseen_is_not(memorised):
    handle, _base, tuned, _members, canary, unseen = memorised
    handle.set_adapter(tuned)
    seen = exposure(handle, FMT, canary, num_candidates=300, seed=0)
    other = exposure(handle, FMT, unseen, num_candidates=300, seed=0)
    assert seen["exposure_sampled"] > 7  # ranked first among 300 sampled of 9,000
    assert seen["exposure_extrapolated"] > seen["exposure_sampled"] - 1
    assert other["exposure_sampled"] < 4


def test_membership_auc_near_half_for_random_labels():
    rng = np.random.default_rng(0)
    losses = rng.normal(2.0, 0.5, size=2000).tolist()
    figures = membership_attack(losses[:1000], losses[1000:])
    assert abs(figures["mia_loss_auc"] - 0.5) < 0.05


def test_membership_detects_lower_member_losses_and_calibration_helps():
    rng = random.Random(0)
    difficulty = [rng.uniform(0.5, 4.0) for _ in range(400)]  # per-example hardness, shared by both models
    members = [d - 0.3 for d in difficulty[:200]]
    nonmembers = difficulty[200:]
    figures = membership_attack(members, nonmembers, difficulty[:200], difficulty[200:])
    assert 0.5 < figures["mia_loss_auc"] < 0.8
    assert figures["mia_ref_auc"] == 1.0 and figures["mia_ref_tpr_at_1fpr"] == 1.0


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
