"""Attention for bf16 / fp16 models on a CPU: plain matmuls and a softmax instead of torch's SDPA kernel,
and a key/value cache kept in fp32.

Two measured costs of bf16 attention on a CPU (2 AVX512-BF16 cores, torch 2.13; SmolLM2, 16 rows over
~380 cached positions, `python benchmarks/decode_profile.py`):
- `scaled_dot_product_attention` with bf16 inputs took 1-3 ms a layer against 0.4-0.5 ms for q·Kᵀ, a
  masked softmax and p·V as plain matmuls; attention was 64% of a bf16 decode step.
- A preallocated cache hands attention a slice of a longer buffer. A bf16 batched matmul copies such
  a slice (every key and value, every layer, every step) and torch's strided bf16 copy is slow; an
  fp32 batched matmul reads the slice in place. So during decoding the cache holds fp32 keys and
  values (`cache_dtype`), the upcast of bf16 values, exact; a step's attention then runs in fp32.
Together they took a bf16 decode step from 181 ms to about 70 ms.

Everything else keeps transformers' SDPA path: fp32 models (whose outputs the engines are tested to
match token for token), CUDA (where SDPA dispatches to fused kernels), attention dropout, position
biases. The function is registered with transformers under `ATTENTION` (with SDPA's mask builder
under the same name) and `fedpit.model.load_model` selects it, so a model's own code is untouched.
"""

from __future__ import annotations

import torch

ATTENTION = "fedpit_sdpa"
_HALF = (torch.bfloat16, torch.float16)


def uses_matmul_attention(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model of this dtype on this device gets `attention_forward` (see the module docstring)."""
    return device.type == "cpu" and dtype in _HALF


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype a preallocated KV cache should store for a model computing in `dtype` (None: its own)."""
    return torch.float32 if uses_matmul_attention(dtype, device) else None


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """softmax(q·Kᵀ·scale + mask)·V with the query heads grouped over their key/value head (no copy of
    K and V per query head), in the dtype of `key` (fp32 when it comes from an fp32 cache), the
    softmax always in fp32. query [B, H, Q, D]; key, value [B, KV, L, D]; attention_mask None, or
    boolean (True: attend) or additive, broadcastable to [B, 1, Q, L]. Returns [B, Q, H, D] in the
    query's dtype.

    Without a mask, Q is 1 or L, and with Q = L the attention is causal (transformers passes no mask
    only then; `attention_forward` leaves its other mask-free case to SDPA). A query that may attend
    to nothing (a left-padding position) gets a finite uniform average where SDPA gives zeros; no
    real position attends to it, and it carries no loss."""
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group * length, dim).to(key.dtype)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scaling)
    scores = scores.view(batch, kv_heads, group, length, keys)
    lowest = torch.finfo(torch.float32).min
    if attention_mask is None:
        if length > 1:
            visible = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~visible, lowest)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, None], lowest)
    else:
        scores = scores + attention_mask[:, :, None].float()
    weights = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, group * length, keys)
    output = torch.matmul(weights, value).view(batch, kv_heads, group, length, dim)
    return output.reshape(batch, heads, length, dim).transpose(1, 2).to(query.dtype).contiguous()


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: matmul attention where it pays, SDPA elsewhere."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # SDPA's own conventions stay with SDPA: no mask with 1 < Q < L means an empty static cache, whose
    # keys SDPA crops to the first Q
    plain = (dropout == 0.0 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and kwargs.get("cache") is None and not kwargs.get("output_attentions", False)
             and (attention_mask is not None or query.shape[2] in (1, key.shape[2])))
    if plain and uses_matmul_attention(query.dtype, query.device):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return matmul_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    """Make `ATTENTION` a valid `attn_implementation` (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION
