"""fedpit's training attention for bf16 models on a CPU (grouped matmuls, fp32 softmax) computes what SDPA
computes, in values and gradients, and is used only where it is meant to be: checked against SDPA in fp32
on the same values (causal, padding, grouped heads, a cached prefix), and inside a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fedpit import attention
from fedpit.attention import ATTENTION, attention_forward, matmul_attention
from fedpit.config import LoraConfig, ModelConfig
from fedpit.model import load_model

BF16 = torch.bfloat16


def reference(query, key, value, mask, scale):
    """SDPA in fp32 on the same values, with K and V repeated per query head; [B, Q, H, D]."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.float().repeat_interleave(group, dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query.float(), key, value, attn_mask=mask, scale=scale,
                                         is_causal=mask is None and query.shape[2] > 1)
    return out.transpose(1, 2)


PADS = [0, 2, 3]


def padded_mask(length: int, keys: int) -> torch.Tensor:
    """Boolean [B, 1, Q, L]: causal (aligned to the last key) and no attention to a row's left padding."""
    mask = torch.ones(length, keys, dtype=torch.bool).tril(keys - length).repeat(len(PADS), 1, 1, 1)
    for row, pad in enumerate(PADS):
        mask[row, :, :, :pad] = False
    return mask


def module(groups: int) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.num_key_value_groups, layer.is_causal = groups, True
    return layer


@pytest.mark.parametrize(("length", "keys", "with_mask"), [(1, 37, True), (1, 37, False), (9, 9, True),
                                                         (9, 9, False), (4, 20, True)])
def test_matmul_attention_matches_sdpa(length, keys, with_mask):
    torch.manual_seed(0)
    heads, kv_heads, dim = 6, 2, 16
    query = torch.randn(len(PADS), heads, length, dim).to(BF16)
    key, value = (torch.randn(len(PADS), kv_heads, keys, dim).to(BF16) for _ in range(2))
    mask = padded_mask(length, keys) if with_mask else None
    got = matmul_attention(query, key, value, mask, dim**-0.5)
    assert got.dtype == BF16 and got.shape == (len(PADS), length, heads, dim)
    real = torch.ones(len(PADS), length, dtype=torch.bool)
    if with_mask:  # left-padding queries attend to nothing: SDPA and we differ there, and nobody reads them
        for row, pad in enumerate(PADS):
            real[row, : max(0, pad - (keys - length))] = False
    torch.testing.assert_close(got.float()[real], reference(query, key, value, mask, dim**-0.5)[real],
                               atol=2e-2, rtol=2e-2)


def test_gradients_match_sdpa_and_a_query_that_sees_nothing_stays_finite():
    torch.manual_seed(1)
    length, dim = 7, 8
    leaves = [torch.randn(len(PADS), h, length, dim).to(BF16).requires_grad_() for h in (4, 2, 2)]
    mask = padded_mask(length, length)
    mask[2] = False  # a whole row of padding
    out, _ = attention_forward(module(2), *leaves, mask, scaling=dim**-0.5)
    upstream = torch.randn(out.shape)
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[2] = False
    keep[1, :2] = False  # row 1's padding queries
    (out.float() * upstream * keep).sum().backward()
    ours = [t.grad.float() for t in leaves]
    assert all(torch.isfinite(g).all() for g in ours)
    exact = [t.detach().float().requires_grad_() for t in leaves]
    (reference(*exact, mask, dim**-0.5) * upstream * keep).nan_to_num().sum().backward()
    for got, want in zip(ours, (t.grad for t in exact)):
        torch.testing.assert_close(got[:2], want[:2], atol=3e-2, rtol=3e-2)


def test_inference_fp32_dropout_and_large_batches_keep_transformers_sdpa(monkeypatch):
    torch.manual_seed(2)
    query, key, value = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    half = [t.to(BF16).requires_grad_() for t in (query, key, value)]
    cases = {
        "fp32": ([query.requires_grad_(), key, value], 0.0),
        "bf16 without gradients": ([t.detach() for t in half], 0.0),
        "attention dropout": (half, 0.1),
        "no mask with 1 < Q < L (an empty static cache)": ([half[0], *(t.repeat(1, 1, 3, 1) for t in half[1:])], 0.0),
    }
    bidirectional = module(2)
    bidirectional.is_causal = False
    cases["a module that is not causal, without a mask"] = (half, 0.0)
    for name, (tensors, dropout) in cases.items():
        layer = bidirectional if name.startswith("a module that is not causal") else module(2)
        torch.manual_seed(5)
        ours, _ = attention_forward(layer, *tensors, None, dropout=dropout, scaling=0.3)
        torch.manual_seed(5)
        theirs, _ = sdpa_attention_forward(layer, *tensors, None, dropout=dropout, scaling=0.3)
        assert torch.equal(ours, theirs), name
    monkeypatch.setattr(attention, "MAX_SAVED_BYTES", 100)  # the weights a backward would keep: too many
    ours, _ = attention_forward(module(2), *half, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module(2), *half, None, scaling=0.3)
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def bf16_handle(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8), seed=0)


def test_a_bf16_cpu_model_gets_it_and_trains_as_with_sdpa(bf16_handle):
    model = bf16_handle.model
    assert model.config._attn_implementation == ATTENTION
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    real = mask.bool()
    runs = {}
    for impl in (ATTENTION, "sdpa"):
        model.set_attn_implementation(impl)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        torch.nn.functional.cross_entropy(logits[real], ids[real]).backward()
        runs[impl] = (logits.detach(), {k: p.grad.float() for k, p in bf16_handle.lora_params.items()
                                        if p.grad is not None})
        model.zero_grad(set_to_none=True)
    model.set_attn_implementation(ATTENTION)
    (ours, ours_grads), (want, want_grads) = runs[ATTENTION], runs["sdpa"]
    torch.testing.assert_close(ours[real], want[real], atol=0.05, rtol=0.05)
    assert ours_grads.keys() == want_grads.keys() and ours_grads
    for key, grad in ours_grads.items():
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, want_grads[key], atol=0.05, rtol=0.1)


def keys_per_matmul_call(monkeypatch) -> list[int]:
    """The number of keys each `matmul_attention` call reads, appended as the calls happen."""
    calls, real = [], attention.matmul_attention
    monkeypatch.setattr(attention, "matmul_attention", lambda q, k, *a: calls.append(k.shape[2]) or real(q, k, *a))
    return calls


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=BF16).masked_fill(~mask, torch.finfo(BF16).min)


@pytest.mark.parametrize(("length", "keys", "kind"), [(150, 150, "padded"), (150, 150, None), (130, 170, "padded"),
                                                      (150, 150, "additive"), (65, 65, "padded")])
def test_a_bf16_prefill_runs_in_causal_blocks_and_matches_sdpa(monkeypatch, length, keys, kind):
    """Without gradients, a prefill longer than a block runs block by block, each block reading only the
    keys up to its last query; the values are SDPA's (fp32 reference) at every real query."""
    torch.manual_seed(3)
    heads, kv_heads, dim = 6, 2, 16
    query = torch.randn(len(PADS), heads, length, dim).to(BF16)
    key, value = (torch.randn(len(PADS), kv_heads, keys, dim).to(BF16) for _ in range(2))
    mask = None if kind is None else padded_mask(length, keys)
    calls = keys_per_matmul_call(monkeypatch)
    with torch.no_grad():
        got, _ = attention_forward(module(3), query, key, value, additive(mask) if kind == "additive" else mask,
                                   scaling=dim**-0.5)
    blocks = -(-length // attention.BLOCK)
    assert calls == [min(keys, keys - length + (b + 1) * attention.BLOCK) for b in range(blocks)]
    real = torch.ones(len(PADS), length, dtype=torch.bool)
    if mask is not None:
        for row, pad in enumerate(PADS):
            real[row, : max(0, pad - (keys - length))] = False
    want = reference(query, key, value, mask, dim**-0.5)
    torch.testing.assert_close(got.float()[real], want[real], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["padded", None, "additive"])
def test_inside_native_softmax_a_prefill_takes_the_c_softmax_block_by_block(monkeypatch, kernels, kind):
    """With the kernels in force, each block of a boolean-masked or causal prefill takes its softmax from C and
    still matches SDPA; an additive mask keeps torch's softmax (the C one reads booleans)."""
    torch.manual_seed(5)
    length, keys, dim = (150, 150, 16) if kind is None else (130, 170, 16)  # no mask means causal only if Q = L
    query = torch.randn(len(PADS), 6, length, dim).to(BF16)
    key, value = (torch.randn(len(PADS), 2, keys, dim).to(BF16) for _ in range(2))
    mask = None if kind is None else padded_mask(length, keys)
    native_calls, real_native = [], attention.native_attention
    monkeypatch.setattr(attention, "native_attention",
                        lambda kernels, q, k, *a: native_calls.append(k.shape[2]) or real_native(kernels, q, k, *a))
    torch_calls = keys_per_matmul_call(monkeypatch)
    with torch.no_grad(), attention.native_softmax(kernels):
        got, _ = attention_forward(module(3), query, key, value, additive(mask) if kind == "additive" else mask,
                                   scaling=dim**-0.5)
    blocks = [keys - length + (b + 1) * attention.BLOCK for b in range(-(-length // attention.BLOCK))]
    assert (torch_calls, native_calls) == (([], [min(keys, n) for n in blocks]) if kind != "additive"
                                           else ([min(keys, n) for n in blocks], []))
    real = torch.ones(len(PADS), length, dtype=torch.bool)
    if mask is not None:  # queries that are all padding (none when keys exceed them by more than the pads)
        for row, pad in enumerate(PADS):
            real[row, : max(0, pad - (keys - length))] = False
    want = reference(query, key, value, mask, dim**-0.5)
    torch.testing.assert_close(got.float()[real], want[real], atol=2e-2, rtol=2e-2)
    assert attention._native is None  # the block ends with torch's softmax back


def test_a_mask_that_is_not_causal_is_not_cropped(monkeypatch):
    torch.manual_seed(4)
    length, dim = 100, 16
    query = torch.randn(2, 4, length, dim).to(BF16)
    key, value = (torch.randn(2, 2, length, dim).to(BF16) for _ in range(2))
    mask = torch.ones(2, 1, length, length, dtype=torch.bool)
    mask[1, :, :, :5] = False  # padding, but every query sees every later key
    calls = keys_per_matmul_call(monkeypatch)
    with torch.no_grad():
        got, _ = attention_forward(module(2), query, key, value, mask, scaling=dim**-0.5)
    assert calls == [length]
    torch.testing.assert_close(got.float(), reference(query, key, value, mask, dim**-0.5), atol=2e-2, rtol=2e-2)


def test_a_bf16_models_long_prefill_matches_sdpa(bf16_handle):
    model = bf16_handle.model
    ids = torch.randint(5, 1000, (2, 3 * attention.BLOCK), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    real = mask.bool()
    logits = {}
    with bf16_handle.inference():
        for impl in (ATTENTION, "sdpa"):
            model.set_attn_implementation(impl)
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits.float()
    model.set_attn_implementation(ATTENTION)
    torch.testing.assert_close(logits[ATTENTION][real], logits["sdpa"][real], atol=0.05, rtol=0.05)
