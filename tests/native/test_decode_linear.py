"""The C linear layer of a decode step (native/kernels.py, decode_linear.c): as close to the exact product as
torch's bf16 `F.linear` for every number of rows it tiles differently (1-8, 9-16, more than 16), output sizes
that are not whole blocks of 16, biases and spaced-out rows; built only where the CPU has AVX512-BF16, and
refusing what would reach C wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BF16 = torch.bfloat16


def _cpu_has_avx512_bf16() -> bool:
    flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    return bool(flags) and "avx512_bf16" in flags[0].split()


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


@pytest.fixture
def product(kernels):
    """The kernels where this CPU computes the C product. Where it does not (no AVX512-BF16), what the library
    must do instead is checked here, and the test has nothing more to compare: the decode step then keeps
    oneDNN's products (test_decode_step.py)."""
    assert kernels.linear_available == _cpu_has_avx512_bf16()
    if not kernels.linear_available:
        weight = kernels.pack_linear(_randn(16, 8, seed=0))
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            kernels.linear(_randn(2, 8, seed=1), weight)
        return None
    return kernels


def test_built_exactly_where_the_cpu_has_avx512_bf16(product):
    assert (product is not None) == _cpu_has_avx512_bf16()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 13, 16, 17, 40])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (50, 64), (7, 30), (16, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_as_close_to_the_exact_product_as_f_linear(product, rows, out_features, in_features, with_bias):
    if product is None:  # the refusal on this CPU, checked by the fixture
        return
    kernels = product
    weight = _randn(out_features, in_features, seed=rows, scale=0.05)
    bias = _randn(out_features, seed=rows + 1) if with_bias else None
    x = _randn(rows, in_features, seed=rows + 2)
    exact = x.double() @ weight.double().T + (bias.double() if with_bias else 0.0)
    ours = kernels.linear(x, kernels.pack_linear(weight), bias)
    theirs = F.linear(x, weight, bias)
    assert ours.dtype == BF16 and ours.shape == (rows, out_features)
    scale = float(exact.abs().max())
    assert float((ours.double() - exact).abs().max()) <= float((theirs.double() - exact).abs().max()) + 1e-3 * scale
    # the output is rounded once: nearly every element is what F.linear gives
    assert float((ours == theirs).float().mean()) >= 0.97


def test_rows_spaced_apart_in_memory(product):
    """The attention's output and slices of wider buffers reach it as views whose rows are further apart."""
    if product is None:  # the refusal on this CPU, checked by the fixture
        return
    kernels = product
    buffer = _randn(6, 100, seed=3)
    x = buffer[:, 4:68]  # row stride 100, 64 inputs
    weight = _randn(40, 64, seed=4, scale=0.05)
    ours = kernels.linear(x, kernels.pack_linear(weight))
    torch.testing.assert_close(ours.float(), F.linear(x.contiguous(), weight).float(), atol=2e-2, rtol=1e-2)


def test_where_the_library_lacks_the_product_it_says_so_instead_of_reaching_c(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "linear_available", False)  # as a library built without AVX512-BF16 reports
    with pytest.raises(RuntimeError, match="without AVX512-BF16; use F.linear"):
        kernels.linear(_randn(2, 8, seed=1), kernels.pack_linear(_randn(16, 8, seed=0)))


def test_refuses_what_would_reach_c_wrongly(kernels, product):
    with pytest.raises(ValueError, match="even number of inputs"):
        kernels.pack_linear(_randn(16, 7, seed=0))
    with pytest.raises(ValueError, match="contiguous bf16 CPU"):
        kernels.pack_linear(_randn(16, 8, seed=0).float())
    if product is None:  # every product is refused on this CPU (the fixture checks it)
        return
    weight = kernels.pack_linear(_randn(16, 8, seed=0))
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        kernels.linear(_randn(2, 6, seed=1), weight)  # another number of inputs
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        kernels.linear(_randn(2, 8, seed=1).float(), weight)
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        kernels.linear(_randn(8, 2, seed=1).T, weight)  # columns, not rows, contiguous
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        kernels.linear(_randn(2, 9, seed=1)[:, :8], weight)  # rows 9 apart: pairs would straddle rows
    with pytest.raises(ValueError, match=r"bias \(15,\) is not \[16\]"):
        kernels.linear(_randn(2, 8, seed=1), weight, _randn(15, seed=2))
