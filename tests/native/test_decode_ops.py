"""The C element-wise work of a decode step (native/kernels.py, decode_ops.c) against the torch operations it
replaces: the residual sum and the rotary embedding bitwise; RMSNorm and SiLU within one bf16 step where an
fp32 bit of a mean or an exponential tips a rounding, equal nearly everywhere else."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, rotate_half

BF16 = torch.bfloat16


def _randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def _within_one_bf16_step(ours: torch.Tensor, theirs: torch.Tensor, nearly_all: float = 0.99) -> None:
    ours, theirs = ours.float(), theirs.float()
    step = theirs.abs().clamp(min=1e-30) * 2.0**-7  # a bf16 step is 2^-8 to 2^-7 of the value
    assert bool(((ours - theirs).abs() <= step).all()), float((ours - theirs).abs().max())
    assert float((ours == theirs).float().mean()) >= nearly_all


@pytest.mark.parametrize("rows,dim", [(1, 64), (5, 576), (3, 72)])  # 72: not a whole number of vectors
def test_add_rms_norm_is_the_residual_sum_then_llamas_rmsnorm(kernels, rows, dim):
    norm = LlamaRMSNorm(dim, eps=1e-5).to(BF16)
    with torch.no_grad():
        norm.weight.copy_(_randn(dim, seed=1) + 1)
    hidden, delta = _randn(rows, dim, seed=2, scale=3.0), _randn(rows, dim, seed=3)
    summed = hidden + delta
    out = torch.empty_like(hidden)
    kernels.add_rms_norm(hidden, delta, norm.weight.detach(), out, norm.variance_epsilon)
    assert torch.equal(hidden, summed)  # in place, bitwise torch's bf16 sum
    with torch.no_grad():
        _within_one_bf16_step(out, norm(summed))
    before = hidden.clone()
    kernels.add_rms_norm(hidden, None, norm.weight.detach(), out, norm.variance_epsilon)  # no residual
    assert torch.equal(hidden, before)
    with torch.no_grad():
        _within_one_bf16_step(out, norm(before))


def test_add_rms_norm_uses_epsilon(kernels):
    """Rows of zeros and near-zeros: only epsilon keeps the norm finite, and it sets the scale."""
    norm = LlamaRMSNorm(8, eps=1e-2).to(BF16)
    hidden = torch.tensor([[0.0] * 8, [1e-3] * 8], dtype=BF16)
    out = torch.empty_like(hidden)
    kernels.add_rms_norm(hidden, None, norm.weight.detach(), out, norm.variance_epsilon)
    with torch.no_grad():
        _within_one_bf16_step(out, norm(hidden), nearly_all=1.0)
    assert bool(out[1].abs().max() < 0.02)  # 1e-3 / sqrt(1e-6 + 1e-2)


@pytest.mark.parametrize("heads_q,heads_k,dim,extra", [(9, 3, 64, 192), (4, 4, 8, 0), (2, 1, 128, 7)])
def test_rotary_is_bitwise_transformers(kernels, heads_q, heads_k, dim, extra):
    """q and k out of the packed product (with v, or anything, after them), at each row's own position."""
    rows = 5
    qkv = _randn(rows, (heads_q + heads_k) * dim + extra, seed=4, scale=2.0)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=heads_q * dim, num_attention_heads=heads_q,
                                              head_dim=dim, max_position_embeddings=4096))
    positions = torch.tensor([[0], [1], [7], [300], [2047]])
    cos, sin = rotary(qkv, positions)  # [rows, 1, dim] in bf16, as the decode step gets them
    q, k = torch.empty(rows, heads_q, dim, dtype=BF16), torch.empty(rows, heads_k, dim, dtype=BF16)
    kernels.rotary(qkv, cos.view(rows, dim), sin.view(rows, dim), q, k)
    heads = qkv[:, : (heads_q + heads_k) * dim].view(rows, heads_q + heads_k, dim)
    expected = heads * cos + rotate_half(heads) * sin
    assert torch.equal(q, expected[:, :heads_q]) and torch.equal(k, expected[:, heads_q:])


def test_silu_mul_is_torchs_silu_times_up(kernels):
    rows, inner = 4, 1536
    gate_up = _randn(rows, 2 * inner, seed=5, scale=4.0)
    gate_up[0, :6] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -200.0], dtype=BF16)  # no overflow anywhere
    out = torch.empty(rows, inner, dtype=BF16)
    kernels.silu_mul(gate_up, out)
    gate, up = gate_up.split(inner, dim=-1)
    _within_one_bf16_step(out, torch.nn.functional.silu(gate) * up)


def test_the_prefill_forms_compute_what_the_step_forms_do_over_many_rows(kernels):
    """`silu_mul_pair` (gate and up apart) and `rms_norm` (no residual) over enough rows to be threaded: the same
    bits as `silu_mul` / `add_rms_norm` row by row, hidden left as it was."""
    rows, inner, dim = 300, 96, 72
    gate_up = _randn(rows, 2 * inner, seed=10, scale=4.0)
    want = torch.empty(rows, inner, dtype=BF16)
    kernels.silu_mul(gate_up, want)
    gate, up = (part.contiguous() for part in gate_up.split(inner, dim=-1))
    got = torch.empty_like(want)
    kernels.silu_mul_pair(gate, up, got)
    assert torch.equal(got, want)
    hidden, weight = _randn(rows, dim, seed=11, scale=3.0), _randn(dim, seed=12) + 1
    before, want, got = hidden.clone(), torch.empty_like(hidden), torch.empty_like(hidden)
    kernels.add_rms_norm(hidden.clone(), None, weight, want, 1e-5)
    kernels.rms_norm(hidden, weight, got, 1e-5)
    assert torch.equal(got, want) and torch.equal(hidden, before)
    with pytest.raises(ValueError, match="silu_mul_pair"):
        kernels.silu_mul_pair(gate, up[:5], got[:, :inner])
    with pytest.raises(ValueError, match="rms_norm"):
        kernels.rms_norm(hidden, weight[:8], got, 1e-5)


def test_they_refuse_what_would_reach_c_wrongly(kernels):
    hidden, weight = _randn(2, 8), _randn(8)
    with pytest.raises(ValueError, match="contiguous bf16"):
        kernels.add_rms_norm(hidden.float(), None, weight.float(), hidden.float(), 1e-5)
    with pytest.raises(ValueError, match="contiguous bf16"):
        kernels.add_rms_norm(_randn(8, 2).t(), None, weight, torch.empty(2, 8, dtype=BF16), 1e-5)
    with pytest.raises(ValueError, match="CPU tensors"):
        kernels.add_rms_norm(hidden.to("meta"), None, weight, torch.empty(2, 8, dtype=BF16), 1e-5)
    with pytest.raises(ValueError, match="do not match"):
        kernels.add_rms_norm(hidden, None, _randn(9), torch.empty(2, 8, dtype=BF16), 1e-5)
    with pytest.raises(ValueError, match="do not match"):
        kernels.rotary(_randn(2, 20), _randn(2, 4), _randn(2, 4), torch.empty(2, 4, 4, dtype=BF16),
                       torch.empty(2, 2, 4, dtype=BF16))  # q and k need 24 columns
    with pytest.raises(ValueError, match="is not"):
        kernels.silu_mul(_randn(2, 10), torch.empty(2, 4, dtype=BF16))


def _torch_softmax(scores: torch.Tensor, attended: torch.Tensor, scale: float) -> torch.Tensor:
    """What `attention.matmul_attention` does to bf16 scores: fp32, scaled, masked, softmax, bf16."""
    masked = scores.float().mul(scale).masked_fill(~attended, torch.finfo(torch.float32).min)
    return torch.softmax(masked, dim=-1).to(BF16)


def _prefill_mask(pads: list[tuple[int, int]], length: int, keys: int) -> torch.Tensor:
    """bool [B, 1, Q, L]: causal (queries the last Q keys), each row's keys [start, end) not attended."""
    mask = torch.ones(length, keys, dtype=torch.bool).tril(keys - length).repeat(len(pads), 1, 1, 1)
    for row, (start, end) in enumerate(pads):
        mask[row, :, :, start:end] = False
    return mask


@pytest.mark.parametrize("length,keys", [(7, 7), (5, 40), (64, 300), (3, 33)])
def test_masked_softmax_is_torchs_masked_softmax(kernels, length, keys):
    """Left padding, padding between a shared beginning and a row's own tokens, and a row that is all padding
    (its queries attend nothing: the same weight on every key, as torch gives); in place."""
    pads = [(0, 0), (0, 2), (1, 3), (0, keys)]
    mask = _prefill_mask(pads, length, keys)
    scores = _randn(len(pads), 6, length, keys, seed=7, scale=4.0)
    want = _torch_softmax(scores, mask, 0.125)
    kernels.masked_softmax(scores, mask, length, 0.125)
    _within_one_bf16_step(scores, want, nearly_all=0.98)
    assert torch.equal(scores == 0, want == 0)  # what is not attended weighs exactly nothing
    assert torch.equal(scores[3], torch.full_like(scores[3], 1.0 / keys))


@pytest.mark.parametrize("length,keys", [(9, 9), (4, 30)])
def test_masked_softmax_without_a_mask_is_causal_over_the_last_keys(kernels, length, keys):
    scores = _randn(2, 3, length, keys, seed=8, scale=4.0)
    causal = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    want = _torch_softmax(scores, causal, 0.3)
    kernels.masked_softmax(scores, None, length, 0.3)
    _within_one_bf16_step(scores, want, nearly_all=0.98)
    assert torch.equal(scores == 0, want == 0)


def test_masked_softmax_reads_a_mask_view_and_broadcasts_its_batch(kernels):
    """A block of a larger mask (a view with the larger mask's strides) and one mask for every row."""
    whole = _prefill_mask([(0, 5)], 12, 12)
    block = whole[..., 4:8, :8]  # queries 4..7 against the keys up to the block's last query
    scores = _randn(3, 2, 4, 8, seed=9, scale=4.0)
    want = _torch_softmax(scores, block, 0.5)
    kernels.masked_softmax(scores, block, 4, 0.5)
    _within_one_bf16_step(scores, want, nearly_all=0.98)


def test_masked_softmax_refuses_what_it_cannot_read(kernels):
    scores = _randn(2, 3, 4, 6)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    strided = torch.ones(2, 1, 6, 4, dtype=torch.bool).transpose(2, 3)  # [2, 1, 4, 6], keys not contiguous
    for bad_mask in (mask.float(), mask[:, :, :3], torch.ones(2, 3, 4, 6, dtype=torch.bool), strided):
        with pytest.raises(ValueError, match="mask"):
            kernels.masked_softmax(scores, bad_mask, 4, 1.0)
    with pytest.raises(ValueError, match="masked_softmax"):
        kernels.masked_softmax(scores, mask, 5, 1.0)  # more queries than the scores have
    with pytest.raises(ValueError, match="contiguous bf16"):
        kernels.masked_softmax(scores.float(), mask, 4, 1.0)
