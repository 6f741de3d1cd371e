"""One decode step (one new token for each row) of a Llama-family model without transformers' per-module cost.

A bf16 decode step of 8 rows on SmolLM2 (30 layers, 2 CPU cores, ~300 tokens of context) took 37.1 ms
through the model's forward, and its products and attention about 28 ms of that: the rest is the Python
around ~40 small operations a layer (module calls, output-capturing wrappers, mask building), paid again
every step. `DecodeStep` runs the same arithmetic layer by layer, calling the model's own modules where they
compute (norms, rotary embedding, activation) and the model's own attention function, with one packed
product for q, k and v and one for gate and up (oneDNN computes a concatenated weight's columns exactly as
it computes each weight's: tested), so its logits are bitwise the model's forward: 31.4 ms for that step
(`python benchmarks/generation_ab.py --lever decode_step` measures it on whole generations: 1.06x per call).
One exception: with no padded row at all, transformers passes SDPA no mask and it takes its grouped-query
path (several times slower on a CPU); the step keeps the masked path, which rounds differently in bf16.

Given the C decode attention (native/decode_attention.py, `model.native_decode_attention`), the step calls it
instead of the attention function: about 2.5x faster than SDPA's CPU kernel, 1.16x per generation call on
the bench's workload, and as close to an exact attention as SDPA, but not bitwise SDPA, so bf16 text can
differ from the forward's.

It is used where packed weights are (packed.py: bf16 on a CPU whose oneDNN computes them exactly), for the
architectures whose decoder layer it mirrors (`SUPPORTED`) with full attention in every layer; everything
else takes the model's forward. fp32 never takes it, so fp32 greedy output stays token-identical to
transformers'. The price is one more copy of the q/k/v and gate/up weights while inference runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedpit.attention import ATTENTION
from fedpit.native.decode_attention import DecodeAttention
from fedpit.packed import PackedLinear, pack_weight, packed_linear, packing_available

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})
"""model_type values whose decoder layer is pre-norm attention + gated MLP, with rotary embeddings from the
model's `rotary_emb` and no per-head norms: what `DecodeStep` computes."""


@dataclass
class _Layer:
    input_norm: nn.Module
    post_norm: nn.Module
    attention: nn.Module  # the model's own, handed to its attention function (scaling, groups, layer index)
    qkv: torch.Tensor  # q, k and v weights concatenated and packed
    qkv_bias: torch.Tensor | None
    o: PackedLinear
    gate_up: torch.Tensor  # gate and up weights concatenated and packed
    gate_up_bias: torch.Tensor | None
    down: PackedLinear
    act: nn.Module


def _concatenated(linears: list[PackedLinear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = pack_weight(torch.cat([linear.weight for linear in linears]))
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else linear.weight.new_zeros(linear.out_features)
                              for b, linear in zip(biases, linears, strict=True)])


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `DecodeStep` cannot compute `model`'s step exactly, or None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED:
        return "architecture"
    if not packing_available():
        return "no packed weights on this CPU"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return f"attention '{getattr(config, '_attn_implementation', None)}'"
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        return "layers that are not full attention"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "model layout"
    if not isinstance(getattr(model, "lm_head", None), PackedLinear):
        return "LM head not packed"
    for layer in inner.layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, PackedLinear) for p in projections):
            return "projections not packed (quantised or unmerged layers)"
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm") or not hasattr(mlp, "act_fn"):
            return "decoder layer layout"
    return None


class DecodeStep:
    """`model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
    past_key_values=cache).logits[:, -1]`, computed without the model's forward. Build with `build`."""

    def __init__(self, model: nn.Module, kernel: DecodeAttention | None = None) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        inner, config = model.model, model.config
        self.embed, self.norm, self.rotary, self.head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, None)
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                attention, mlp = layer.self_attn, layer.mlp
                qkv, qkv_bias = _concatenated([attention.q_proj, attention.k_proj, attention.v_proj])
                gate_up, gate_up_bias = _concatenated([mlp.gate_proj, mlp.up_proj])
                self.layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm, attention, qkv,
                                          qkv_bias, attention.o_proj, gate_up, gate_up_bias, mlp.down_proj,
                                          mlp.act_fn))
        first = inner.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = first.q_proj.out_features // self.head_dim
        self.qk_v = [first.q_proj.out_features + first.k_proj.out_features, first.v_proj.out_features]
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features
        group = first.q_proj.out_features // first.k_proj.out_features
        supported = kernel is not None and kernel.supports(self.head_dim, group, first.q_proj.weight.dtype)
        self.native = kernel if supported else None
        """The C decode attention (native/decode_attention.py) in place of the model's attention function."""

    @classmethod
    def build(cls, model: nn.Module, kernel: DecodeAttention | None = None) -> DecodeStep | None:
        """The step for `model` (the transformers causal LM, inside `ModelHandle.inference`, its linear
        layers packed), or None where it would not be exactly the model's forward. With `kernel`, the
        step's attention is that kernel's: the same computation, rounded differently."""
        return None if unsupported_reason(model) else cls(model, kernel)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits [rows, vocabulary] for the token after `tokens` [rows]; `mask` [rows, positions] covers
        the cache's positions and the new one (1: attended), `positions` [rows] are the new tokens'."""
        rows = tokens.shape[0]
        hidden = self.embed(tokens[:, None])
        cos, sin = self.rotary(hidden, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]  # over the heads, as the model's apply_rotary_pos_emb
        attended = mask.bool() if self.native is not None else mask[:, None, None, :].bool()
        shape = (rows, 1, -1, self.head_dim)
        for index, layer in enumerate(self.layers):
            residual = hidden
            normed = layer.input_norm(hidden)
            qk, v = packed_linear(normed, layer.qkv, layer.qkv_bias).split(self.qk_v, dim=-1)
            qk, v = qk.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin  # q and k side by side: one rotary, each element as before
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            k, v = cache.update(k, v, index)
            if self.native is not None:
                out = self.native(q, k, v, attended, layer.attention.scaling).view(rows, 1, -1)
            else:
                out, _ = self.attend(layer.attention, q, k, v, attended, dropout=0.0, scaling=layer.attention.scaling)
                out = out.reshape(rows, 1, -1).contiguous()
            hidden = residual + packed_linear(out, layer.o.packed, layer.o.bias)
            residual = hidden
            normed = layer.post_norm(hidden)
            gate, up = packed_linear(normed, layer.gate_up, layer.gate_up_bias).split(self.intermediate, dim=-1)
            hidden = residual + packed_linear(layer.act(gate) * up, layer.down.packed, layer.down.bias)
        return packed_linear(self.norm(hidden), self.head.packed, self.head.bias)[:, -1]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
