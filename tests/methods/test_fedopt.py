"""Server optimisers against updates computed by hand from known moments (Reddi et al. 2021)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpit import config as config_mod
from fedpit.methods import build_method
from fedpit.types import ClientUpload

GLOBAL = {"w": torch.tensor([1.0, -2.0])}
# Two clients, 1:3 examples: weighted mean = [2.0, -1.0], so the pseudo-gradient is [1.0, 1.0].
UPLOADS = [ClientUpload("a", {"w": torch.tensor([5.0, 2.0])}, 1),
           ClientUpload("b", {"w": torch.tensor([1.0, -2.0])}, 3)]


def _method(name, **options):
    sets = [f"method.name='{name}'", *(f"method.{k}={v}" for k, v in options.items())]
    return build_method(config_mod.load(None, sets))


def test_fedavgm_momentum():
    method, state = _method("fedavgm", server_lr=0.5, momentum=0.9), {}
    first = method.aggregate(GLOBAL, UPLOADS, state)  # m = 1 -> x = 1 + 0.5
    assert torch.allclose(first["w"], torch.tensor([1.5, -1.5]))
    second = method.aggregate(first, UPLOADS, state)  # delta = [0.5, 0.5]; m = 0.9 + 0.5 = 1.4
    assert torch.allclose(second["w"], first["w"] + 0.5 * 1.4)


@pytest.mark.parametrize("name, v1", [
    ("fedadagrad", 1e-2**2 + 1.0),                            # v = tau^2 + d^2
    ("fedadam", 0.99 * 1e-2**2 + 0.01 * 1.0),                 # v = b2 v0 + (1 - b2) d^2
    ("fedyogi", 1e-2**2 + 0.01 * 1.0),                        # v = v0 - (1 - b2) d^2 sign(v0 - d^2), v0 < d^2
])
def test_adaptive_first_step(name, v1):
    method, state = _method(name, server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.01), {}
    result = method.aggregate(GLOBAL, UPLOADS, state)
    m1 = 0.1 * 1.0  # (1 - b1) * d
    expected = GLOBAL["w"] + 0.1 * m1 / (math.sqrt(v1) + 0.01)
    assert torch.allclose(result["w"], expected, atol=1e-6)
    assert torch.allclose(state["optimizer"]["v/w"], torch.full((2,), v1))


def test_fedyogi_second_moment_shrinks_towards_small_gradients():
    method, state = _method("fedyogi", server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.01), {}
    state["optimizer"] = {"m/w": torch.zeros(2), "v/w": torch.full((2,), 4.0)}
    method.aggregate(GLOBAL, UPLOADS, state)  # v0 = 4 > d^2 = 1: v = 4 - 0.01 * 1 * (+1)
    assert torch.allclose(state["optimizer"]["v/w"], torch.full((2,), 3.99))


def test_bad_server_options():
    with pytest.raises(Exception, match="beta1"):
        _method("fedadam", beta1=1.5)
