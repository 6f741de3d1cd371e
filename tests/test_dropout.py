from __future__ import annotations

import math

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fedpit import dropout as dropout_module
from fedpit.config import LoraConfig, ModelConfig
from fedpit.dropout import FastDropout, dropped_positions
from fedpit.model import load_model


def test_fast_dropout_drops_each_element_independently_at_rate_p_and_is_unbiased():
    dropout = FastDropout(0.05).train()
    n = 4_000_000
    torch.manual_seed(0)
    out = dropout(torch.ones(n))
    dropped = out == 0
    sigma = math.sqrt(0.05 * 0.95 / n)
    assert abs(dropped.float().mean().item() - 0.05) < 5 * sigma
    for part in dropped.view(4, -1):  # the end of the tensor as often as its start (no draw ran short)
        assert abs(part.float().mean().item() - 0.05) < 5 * 2 * sigma
    # independence: a dropped element's neighbour is dropped with probability p, not more or less
    both = (dropped[1:] & dropped[:-1]).float().mean().item()
    assert abs(both - 0.05**2) < 5 * math.sqrt(0.05**2 / n)
    assert torch.equal(out[~dropped], torch.full_like(out[~dropped], 1 / 0.95))
    assert dropout.keep_scale == pytest.approx(1 / 0.95)
    assert abs(out.mean().item() - 1.0) < 5 * sigma / 0.95
    torch.manual_seed(0)
    assert torch.equal(dropout(torch.ones(n)), out), "the same seed should give the same mask"


def test_dropped_positions_cover_the_whole_tensor_at_any_rate():
    torch.manual_seed(1)
    for n, p in ((0, 0.3), (1, 0.5), (10, 0.9), (100_000, 0.5), (100_000, 0.001)):
        positions = dropped_positions(n, p)
        assert positions.dtype == torch.int64
        assert bool((positions[1:] > positions[:-1]).all()), "increasing, no position twice"
        assert bool(((positions >= 0) & (positions < n)).all())
        if n >= 100_000:
            assert abs(len(positions) / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    # the gap between two drops is geometric: P(gap = 0) = p
    positions = dropped_positions(1_000_000, 0.2)
    gaps = positions[1:] - positions[:-1] - 1
    assert abs((gaps == 0).float().mean().item() - 0.2) < 0.01
    assert abs(gaps.float().mean().item() - 0.8 / 0.2) < 0.05


def test_fast_dropout_gradient_is_the_mask_and_eval_or_zero_p_is_the_identity():
    dropout = FastDropout(0.3).train()
    x = torch.randn(33, 7).t().requires_grad_()  # not contiguous: the mask follows the logical layout
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


def test_dropped_positions_draws_again_when_one_draw_falls_short(monkeypatch):
    # uniform draws of 0 make every gap 0: each draw then covers only as many elements as it drew,
    # far fewer than n, and every element must still be reached
    monkeypatch.setattr(dropout_module.torch, "rand", lambda count, dtype: torch.zeros(count, dtype=dtype))
    assert torch.equal(dropped_positions(5_000, 0.01), torch.arange(5_000))


def test_off_the_cpu_fast_dropout_is_torchs_dropout(monkeypatch):
    def host_positions(n, p):
        raise AssertionError("positions drawn on the host for a tensor that is not on the CPU")

    monkeypatch.setattr(dropout_module, "dropped_positions", host_positions)
    x = torch.empty(64, 32, device="meta")  # shapes only: what a device tensor takes without a device
    out = FastDropout(0.1).train()(x)
    assert out.device.type == "meta" and out.shape == x.shape
