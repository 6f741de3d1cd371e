"""Attention for training a bf16 / fp16 model on a CPU: two matmuls and a softmax instead of torch's SDPA.

On a CPU, SDPA's bf16 backward pass is slow, and transformers first copies K and V once per query
head (`repeat_kv`) for it. For one layer of the bench's training batches (8 rows of ~130 tokens,
SmolLM2's 9 query heads over 3 key/value heads) forward plus backward took 28 ms with SDPA against
10-13 ms for q·Kᵀ, a masked fp32 softmax and p·V with the query heads grouped over their key/value
head; over 30 layers that is about an eighth of a training step.

The matmuls keep the [rows, heads, queries, keys] weights for the backward pass, where SDPA keeps
one number per query. So they are used only while that stays small (`MAX_SAVED_BYTES` per layer), and
only when gradients are being taken: inference (generation, scoring) keeps transformers' SDPA, whose
left-padded decode path measured as fast as the matmuls (docs/performance.md). fp32 models, CUDA,
attention dropout and position biases keep SDPA too. The function is registered with transformers
under `ATTENTION` (with SDPA's mask builder) and `fedpit.model.load_model` selects it for bf16 and fp16
models on a CPU, so a model's own code is untouched.

Inference has one more case: a bf16 prefill (a prompt's positions at once, no gradients). There SDPA's
CPU kernel ran 16 prompts of 338 tokens at 37 ms a layer; the same matmuls over blocks of `BLOCK`
queries, each block with only the keys up to its last query, took 22 ms, as a causal mask leaves the
rest of the keys unread (`blocked_attention`). Keys are cropped only where the mask itself says no
query of the block attends past them, so a mask that is not causal gets the unblocked matmuls.

Inside `native_softmax(kernels)` (a model's inference block, where the C kernels of native/ are built) a
prefill's softmax is one C pass (`DecodeKernels.masked_softmax`) over the bf16 scores in place, where torch
spent five passes (cast to fp32, scale, mask, softmax, cast back) and their allocations: ~40% of the bench
round's prefill attention time (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedpit.native.kernels import DecodeKernels

ATTENTION = "fedpit_sdpa"
MAX_SAVED_BYTES = 64 * 2**20
BLOCK = 64  # queries per block of a prefill: 48-64 measured alike, 128 was 16% slower, 338 (no blocks) 70%
_HALF = (torch.bfloat16, torch.float16)
_native: DecodeKernels | None = None


@contextmanager
def native_softmax(kernels: DecodeKernels | None) -> Iterator[None]:
    """Blocked prefills in this block take their softmax from `kernels` (None: torch's). Process-wide, like
    the attention registry itself; blocks nest (the outer one's kernels come back at the end)."""
    global _native
    previous, _native = _native, kernels
    try:
        yield
    finally:
        _native = previous


def uses_matmul_attention(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    """Whether `attention_forward` computes this call with matmuls (see the module docstring)."""
    batch, heads, length, _ = query.shape
    saved = batch * heads * length * key.shape[2] * (4 + query.element_size())  # fp32 softmax + its cast
    return (torch.is_grad_enabled() and query.requires_grad and query.device.type == "cpu"
            and query.dtype in _HALF and dropout == 0.0 and saved <= MAX_SAVED_BYTES
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and kwargs.get("cache") is None and not kwargs.get("output_attentions", False))


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """softmax(q·Kᵀ·scale + mask)·V with the query heads grouped over their key/value head (no copy of
    K and V per query head), the softmax in fp32. query [B, H, Q, D]; key, value [B, KV, L, D];
    attention_mask None (causal, the queries being the last Q of the L positions) or boolean (True:
    attend) or additive, broadcastable to [B, 1, Q, L]. Returns
    [B, Q, H, D]. A query that may attend to nothing (a left-padding position) gets a finite
    average where SDPA gives zeros; no real position attends to it, and it carries no loss."""
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group * length, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scaling)
    scores = scores.view(batch, kv_heads, group, length, keys)
    lowest = torch.finfo(torch.float32).min
    if attention_mask is None:
        causal = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
        scores = scores.masked_fill(~causal, lowest)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, None], lowest)
    else:
        scores = scores + attention_mask[:, :, None].float()
    weights = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, group * length, keys)
    output = torch.matmul(weights, value).view(batch, kv_heads, group, length, dim)
    return output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous()


def uses_blocked_attention(query: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    """Whether `attention_forward` computes this call with `blocked_attention`: a bf16 CPU prefill longer
    than a block, without gradients (see the module docstring)."""
    return (query.shape[2] > BLOCK and query.device.type == "cpu" and query.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and query.requires_grad) and dropout == 0.0
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and kwargs.get("cache") is None and not kwargs.get("output_attentions", False))


def native_attention(kernels: DecodeKernels, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """`matmul_attention` with the softmax in C, on the bf16 scores in place; [B, Q, H, D]. Takes no mask
    (causal) or a boolean one."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, group * length, dim), key.transpose(-1, -2))
    kernels.masked_softmax(scores.view(batch, heads, length, -1), attention_mask, length, scaling)
    output = torch.matmul(scores, value).view(batch, kv_heads, group, length, dim)
    return output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous()


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """`matmul_attention` over blocks of `BLOCK` queries, each with the keys up to its last query only
    (the queries being the last Q of the L keys); [B, Q, H, D]. A mask that lets a block's queries
    attend past those keys (not causal) is computed whole, unblocked."""
    batch, heads, length, dim = query.shape
    keys = key.shape[2]
    offset = keys - length  # a cached prefix: query i is key position offset + i
    if attention_mask is not None:
        for start in range(0, length, BLOCK):
            end = min(length, start + BLOCK)
            future = attention_mask[..., start:end, offset + end:]
            attended = future if future.dtype == torch.bool else future > torch.finfo(future.dtype).min / 2
            if bool(attended.any()):
                return matmul_attention(query, key, value, attention_mask, scaling)
    native = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                        and attention_mask.shape[1] == 1 and attention_mask.stride(-1) == 1)
    kernels = _native if native else None
    output = query.new_empty((batch, length, heads, dim))
    for start in range(0, length, BLOCK):
        end = min(length, start + BLOCK)
        seen = offset + end
        mask = None if attention_mask is None else attention_mask[..., start:end, :seen]
        block = (query[:, :, start:end], key[:, :, :seen], value[:, :, :seen], mask, scaling)
        output[:, start:end] = matmul_attention(*block) if kernels is None else native_attention(kernels, *block)
    return output


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: matmul attention where it pays, SDPA elsewhere."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # no mask means causal only for a causal module whose queries are all the positions (with Q != L it
    # means an empty static cache, whose keys SDPA crops): otherwise SDPA's own conventions apply
    mask_free_ok = attention_mask is not None or (query.shape[2] == key.shape[2] and getattr(module, "is_causal", True))
    if mask_free_ok and uses_matmul_attention(query, key, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return matmul_attention(query, key, value, attention_mask, scale), None
    if mask_free_ok and uses_blocked_attention(query, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return blocked_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    """Make `ATTENTION` a valid `attn_implementation` (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION
