"""fedpit's CPU attention for bf16 models (matmuls, fp32 softmax, an fp32 KV cache) computes what SDPA
computes: checked against SDPA in fp32 on the same values, for decoding, prefill, a cached prefix,
padding and grouped heads, and inside a model (logits, gradients, cached decoding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedpit.attention import ATTENTION, attention_forward, cache_dtype, matmul_attention
from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.kvcache import PreallocatedLayer, preallocated_cache
from fedpit.model import load_model

BF16 = torch.bfloat16
CPU = torch.device("cpu")


def reference(query, key, value, mask, scale):
    """SDPA in fp32 on the same values, with K and V repeated per query head; [B, Q, H, D]."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.float().repeat_interleave(group, dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query.float(), key, value, attn_mask=mask, scale=scale,
                                         is_causal=mask is None and query.shape[2] > 1)
    return out.transpose(1, 2)


def padded_mask(batch: int, length: int, keys: int, pads: list[int]) -> torch.Tensor:
    """Boolean [B, 1, Q, L]: causal (aligned to the last key) and no attention to a row's left padding."""
    mask = torch.ones(length, keys, dtype=torch.bool).tril(keys - length).repeat(batch, 1, 1, 1)
    for row, pad in enumerate(pads):
        mask[row, :, :, :pad] = False
    return mask


@pytest.mark.parametrize(("length", "keys", "with_mask"), [(1, 37, True), (1, 37, False), (9, 9, True),
                                                         (9, 9, False), (4, 20, True)])
@pytest.mark.parametrize("cache_fp32", [False, True])
def test_matmul_attention_matches_sdpa(length, keys, with_mask, cache_fp32):
    torch.manual_seed(0)
    batch, heads, kv_heads, dim = 3, 6, 2, 16
    query = torch.randn(batch, heads, length, dim).to(BF16)
    key, value = (torch.randn(batch, kv_heads, keys, dim).to(BF16) for _ in range(2))
    if cache_fp32:
        key, value = key.float(), value.float()
    mask = padded_mask(batch, length, keys, [0, 2, 3]) if with_mask else None
    got = matmul_attention(query, key, value, mask, dim**-0.5)
    assert got.dtype == BF16 and got.shape == (batch, length, heads, dim)
    if with_mask:  # left-padding queries attend to nothing: SDPA and we differ there, and nobody reads them
        real = torch.ones(batch, length, dtype=torch.bool)
        for row, pad in enumerate([0, 2, 3]):
            real[row, : max(0, pad - (keys - length))] = False
    else:
        real = torch.ones(batch, length, dtype=torch.bool)
    want = reference(query, key, value, mask, dim**-0.5)
    torch.testing.assert_close(got.float()[real], want[real], atol=2e-2, rtol=2e-2)


def test_additive_mask_and_a_query_that_sees_nothing_stays_finite():
    torch.manual_seed(1)
    query = torch.randn(2, 4, 1, 8).to(BF16)
    key, value = (torch.randn(2, 2, 5, 8).to(BF16) for _ in range(2))
    allowed = torch.tensor([[True, True, False, True, True], [False] * 5]).view(2, 1, 1, 5)
    additive = torch.zeros(2, 1, 1, 5).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got_bool = matmul_attention(query, key, value, allowed, 8**-0.5)
    got_add = matmul_attention(query, key, value, additive, 8**-0.5)
    assert torch.isfinite(got_bool).all() and torch.isfinite(got_add).all()
    torch.testing.assert_close(got_bool[0], got_add[0])
    torch.testing.assert_close(got_bool[:1].float(), reference(query[:1], key[:1], value[:1], allowed[:1], 8**-0.5),
                               atol=2e-2, rtol=2e-2)


def test_fp32_and_dropout_keep_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key, value = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    ours, _ = attention_forward(module, query, key, value, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    assert torch.equal(ours, theirs)  # fp32: the very same call
    q, k, v = (t.to(BF16) for t in (query, key, value))
    cases = {"attention dropout": (q, k, v, 0.1),
             "no mask with 1 < Q < L: an empty static cache, whose keys SDPA crops": (q, k.repeat(1, 1, 3, 1),
                                                                                     v.repeat(1, 1, 3, 1), 0.0)}
    for q_, k_, v_, dropout in cases.values():
        torch.manual_seed(5)
        ours, _ = attention_forward(module, q_, k_, v_, None, dropout=dropout, scaling=0.3)
        torch.manual_seed(5)
        theirs, _ = sdpa_attention_forward(module, q_, k_, v_, None, dropout=dropout, scaling=0.3)
        assert torch.equal(ours, theirs)
    assert cache_dtype(torch.float32, CPU) is None and cache_dtype(BF16, CPU) is torch.float32
    assert cache_dtype(BF16, torch.device("cuda")) is None


def test_fp32_cache_layer_returns_a_prefill_its_own_states_then_fp32_views():
    layer = PreallocatedLayer(capacity=8, store_dtype=torch.float32)
    k0, v0 = torch.randn(2, 1, 3, 4).to(BF16), torch.randn(2, 1, 3, 4).to(BF16)
    keys, values = layer.update(k0, v0)
    assert keys is k0 and values is v0  # the prefill attends in the model's dtype
    k1, v1 = torch.randn(2, 1, 1, 4).to(BF16), torch.randn(2, 1, 1, 4).to(BF16)
    keys, values = layer.update(k1, v1)
    assert keys.dtype == torch.float32 and keys.shape == (2, 1, 4, 4)
    assert torch.equal(keys, torch.cat([k0, k1], dim=2).float())  # the upcast is exact
    assert torch.equal(values, torch.cat([v0, v1], dim=2).float())


@pytest.fixture(scope="module")
def bf16_handle(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8), seed=0)


def test_a_bf16_cpu_model_gets_it_and_matches_sdpa_logits_and_gradients(bf16_handle, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = bf16_handle.model
    assert model.config._attn_implementation == ATTENTION
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    ours = model(input_ids=ids, attention_mask=mask).logits.float()
    want = sdpa(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], want[real], atol=0.05, rtol=0.05)
    ours_loss = torch.nn.functional.cross_entropy(ours[real], ids[real])
    ours_loss.backward()
    grads = [p.grad for p in bf16_handle.lora_params.values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_cached_bf16_decoding_matches_recomputing_the_whole_sequence(bf16_handle):
    """A prefill into an fp32 cache, then one-token steps: each step's logits equal a fresh forward over
    the whole (left-padded) sequence, which never touches the cache."""
    model = bf16_handle.model
    ids = torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = preallocated_cache(model.config, 16, cache_dtype(model.dtype, CPU))
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        for _ in range(4):
            token = out.logits[:, -1].argmax(-1)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions[:, -1:],
                        past_key_values=cache, use_cache=True)
            assert cache.layers[0].keys.dtype == torch.float32
            full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1].float(), full.float(), atol=0.05, rtol=0.05)
