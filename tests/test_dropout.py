from __future__ import annotations

import math

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fedpit.config import LoraConfig, ModelConfig
from fedpit.dropout import FastDropout
from fedpit.model import load_model


def test_fast_dropout_drops_at_rate_p_in_every_slice_of_a_random_word_and_is_unbiased():
    dropout = FastDropout(0.05).train()
    n = 4_000_000
    torch.manual_seed(0)
    out = dropout(torch.ones(n))
    dropped = out == 0
    sigma = math.sqrt(0.05 * 0.95 / (n // 4))
    for position in range(4):  # each 16-bit slice of the 64-bit words, so no slice is biased
        assert abs(dropped.view(-1, 4)[:, position].float().mean().item() - 0.05) < 5 * sigma
    assert torch.equal(out[~dropped], torch.full_like(out[~dropped], dropout.keep_scale))
    assert dropout.keep_scale == pytest.approx(1 / (1 - dropout.dropped_levels / 65536))
    assert abs(out.mean().item() - 1.0) < 5 * sigma / 0.95
    torch.manual_seed(0)
    assert torch.equal(dropout(torch.ones(n)), out), "the same seed should give the same mask"


def test_fast_dropout_gradient_is_the_mask_and_eval_or_zero_p_is_the_identity():
    dropout = FastDropout(0.3).train()
    x = torch.randn(7, 33, requires_grad=True)  # 231 elements: not a multiple of 4
    out = dropout(x)
    out.sum().backward()
    kept = out != 0
    assert torch.equal(x.grad, kept.float() * dropout.keep_scale)
    assert 0.15 < 1 - kept.float().mean().item() < 0.45
    x = torch.randn(5, 6)
    assert dropout.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        FastDropout(1.0)


def test_lora_layers_use_fast_dropout(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"),
                        LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj")))
    layers = [m for m in handle.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(d, FastDropout) and d.p == 0.1 for m in layers for d in m.lora_dropout.values())
