"""The C decode attention (native/kernels.py): equal to an fp64 softmax attention up to bf16 rounding, on cache
views, grouped query heads, head sizes it specialises and those it does not, and left padding whose keys and
values are huge; and it refuses what it was not built for."""

from __future__ import annotations

import pytest
import torch

from fedpit.native.kernels import DecodeKernels

BF16 = torch.bfloat16


def _inputs(rows: int, kv_heads: int, group: int, keys: int, dim: int, seed: int = 0):
    """q [rows, heads, 1, dim]; K and V as views of a cache with room for more keys; left padding whose keys
    and values are 1e4, so that a padded position that leaked into the result would show."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, kv_heads * group, 1, dim, generator=generator).to(BF16)
    capacity = keys + 5
    k_buffer = torch.randn(rows, kv_heads, capacity, dim, generator=generator).to(BF16)
    v_buffer = torch.randn(rows, kv_heads, capacity, dim, generator=generator).to(BF16)
    attended = torch.ones(rows, keys, dtype=torch.bool)
    for row in range(rows):
        padding = int(torch.randint(0, keys, (1,), generator=generator)) if row % 2 else 0
        attended[row, :padding] = False
        k_buffer[row, :, :padding] = 1e4
        v_buffer[row, :, :padding] = 1e4
    return q, k_buffer[:, :, :keys], v_buffer[:, :, :keys], attended


def _reference(q, k, v, attended, scale):
    """softmax(q·Kᵀ·scale + mask)·V in fp64 with the query heads expanded over their key/value head."""
    group = q.shape[1] // k.shape[1]
    k64, v64 = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.double() @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~attended[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v64)[:, :, 0]


@pytest.mark.parametrize("rows,kv_heads,group,keys,dim", [
    (1, 1, 1, 1, 64),     # one key: a block of four with three left over
    (3, 3, 3, 17, 64),    # SmolLM2's heads
    (8, 3, 3, 300, 64),   # a decode step of the bench
    (2, 2, 4, 33, 128),   # the other specialised head size, more query heads than the vdpbf16ps path takes
    (3, 2, 2, 40, 128),   # the vdpbf16ps path (AVX512-BF16) at that head size
    (5, 1, 7, 50, 8),     # a head size the kernel does not specialise
    (2, 4, 1, 9, 256),    # no grouping, the largest head
])
def test_equals_an_fp64_attention_up_to_bf16_rounding(kernels, rows, kv_heads, group, keys, dim):
    q, k, v, attended = _inputs(rows, kv_heads, group, keys, dim)
    scale = dim ** -0.5
    ours = kernels.attention(q, k, v, attended, scale)
    assert ours.shape == (rows, kv_heads * group, dim) and ours.dtype == BF16
    expected = _reference(q, k, v, attended, scale)
    torch.testing.assert_close(ours.double(), expected, atol=4e-3, rtol=8e-3)  # about one bf16 step
    # and no further from it than SDPA, which rounds q·Kᵀ in bf16 too
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=attended[:, None, None, :],
        scale=scale)[:, :, 0]
    assert (ours.double() - expected).abs().max() <= (sdpa.double() - expected).abs().max() + 2e-3


def test_refuses_what_it_was_not_built_for(kernels):
    q, k, v, attended = _inputs(2, 2, 2, 8, 64)
    scale = 0.125
    with pytest.raises(ValueError, match="one bf16 query"):
        kernels.attention(q.float(), k, v, attended, scale)
    with pytest.raises(ValueError, match="one bf16 query"):
        kernels.attention(torch.cat([q, q], dim=2), k, v, attended, scale)  # two query positions
    with pytest.raises(ValueError, match="contiguous last dimension"):
        kernels.attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, attended, scale)
    with pytest.raises(ValueError, match="CPU tensors"):  # a device pointer would reach C
        kernels.attention(q.to("meta"), k.to("meta"), v.to("meta"), attended.to("meta"), scale)
    with pytest.raises(ValueError, match="attended must be a bool"):
        kernels.attention(q, k, v, attended.long(), scale)
    with pytest.raises(ValueError, match="attended must be a bool"):
        kernels.attention(q, k, v, attended[:, 1:], scale)
    assert not DecodeKernels.supports(512, 2, BF16) and not DecodeKernels.supports(64, 32, BF16)
    assert not DecodeKernels.supports(64, 2, torch.float32) and DecodeKernels.supports(64, 3, BF16)
    assert not DecodeKernels.supports(63, 1, BF16)  # the rotary embedding rotates halves
