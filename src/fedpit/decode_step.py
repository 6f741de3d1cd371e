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

Given the C decode kernels (native/kernels.py, `model.native_decode`), the step runs its attention (about 2.5x
faster than SDPA's CPU kernel, as close to an exact attention as SDPA, not bitwise SDPA) and, in one call each,
the norms with their residual sums, the rotary embedding and the MLP's activation in them (8 rows, ~300 tokens:
a step of 24.0 ms, against 26.1 with only the attention in C and 34.7 with torch's operations and SDPA;
`benchmarks/decode_profile.py`), and on a CPU with AVX512-BF16 its linear layers and LM head too, with their
weights packed for the C product when the step is built: 15.6 against 22.0 ms for that step, 9.5 against 16.1
for one row, 25.0 against 30.2 for 16 (`decode_profile.py --products c|onednn`). The logits are then the
forward's up to bf16 rounding, not bitwise, so bf16 text can differ from the forward's. With the C products,
all layers of a step run in one C call (`decode_layers.c`, `fused`), bitwise the per-layer loop of
`_native_step` without its ~2 ms of Python a step; the caches claim each new position and the C loop writes it.

It is used where packed weights are (packed.py: bf16 on a CPU whose oneDNN computes them exactly), for the
architectures whose decoder layer it mirrors (`SUPPORTED`) with full attention in every layer; everything
else takes the model's forward. fp32 never takes it, so fp32 greedy output stays token-identical to
transformers'. The price is one more copy of the q/k/v and gate/up weights while inference runs (of every
linear weight and the LM head with the C products: about 260 MB for SmolLM2).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedpit.attention import ATTENTION
from fedpit.native.kernels import DecodeKernels
from fedpit.packed import PackedLinear, pack_weight, packed_linear, packing_available

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})
"""model_type values whose decoder layer is pre-norm attention + gated MLP, with rotary embeddings from the
model's `rotary_emb` and no per-head norms: what `DecodeStep` computes."""


@dataclass
class _Layer:
    """One decoder layer's modules and its weights, packed for the step's product (`DecodeStep.product`)."""

    input_norm: nn.Module
    post_norm: nn.Module
    attention: nn.Module  # the model's own, handed to its attention function (scaling, groups, layer index)
    qkv: Any  # q, k and v weights concatenated
    qkv_bias: torch.Tensor | None
    o: Any
    o_bias: torch.Tensor | None
    gate_up: Any  # gate and up weights concatenated
    gate_up_bias: torch.Tensor | None
    down: Any
    down_bias: torch.Tensor | None
    act: nn.Module


def _concatenated(linears: list[PackedLinear], pack: Callable) -> tuple[Any, torch.Tensor | None]:
    weight = pack(torch.cat([linear.weight for linear in linears]))
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else linear.weight.new_zeros(linear.out_features)
                              for b, linear in zip(biases, linears, strict=True)])


def _single(linear: PackedLinear, pack: Callable | None) -> Any:
    """The layer's weight for the step's product: oneDNN's packed copy, which the model's prefill shares,
    where the step uses oneDNN (`pack` None); a copy in the C product's layout otherwise."""
    return linear.packed if pack is None else pack(linear.weight)


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

    def __init__(self, model: nn.Module, kernels: DecodeKernels | None = None) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        inner, config = model.model, model.config
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, None)
        first = inner.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = first.q_proj.out_features // self.head_dim
        self.kv_heads = first.k_proj.out_features // self.head_dim
        self.qk_v = [first.q_proj.out_features + first.k_proj.out_features, first.v_proj.out_features]
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features
        supported = kernels is not None and _kernels_compute(model) and \
            kernels.supports(self.head_dim, self.heads // self.kv_heads, first.q_proj.weight.dtype)
        self.native = kernels if supported else None
        """The C decode kernels (native/kernels.py) in place of torch's operations and the attention function."""
        c_products = self.native is not None and self.native.linear_available and all(
            linear.in_features % 2 == 0 for linear in _linears(model))
        self.product: Callable = self.native.linear if c_products else packed_linear
        """Every linear layer's product: the C one (decode_linear.c) with the kernels where the CPU has
        AVX512-BF16, oneDNN's with packed weights otherwise (and always without the kernels: bitwise the forward)."""
        pack = self.native.pack_linear if c_products else None
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                attention, mlp = layer.self_attn, layer.mlp
                qkv, qkv_bias = _concatenated([attention.q_proj, attention.k_proj, attention.v_proj],
                                              pack or pack_weight)
                gate_up, gate_up_bias = _concatenated([mlp.gate_proj, mlp.up_proj], pack or pack_weight)
                self.layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm, attention, qkv,
                                          qkv_bias, _single(attention.o_proj, pack), attention.o_proj.bias, gate_up,
                                          gate_up_bias, _single(mlp.down_proj, pack), mlp.down_proj.bias, mlp.act_fn))
            self.head, self.head_bias = _single(model.lm_head, pack), model.lm_head.bias
        self.eps = self.norm.variance_epsilon
        self.fused = c_products and {self.eps} == {n.variance_epsilon for x in self.layers
                                                     for n in (x.input_norm, x.post_norm)} \
            and len({x.attention.scaling for x in self.layers}) == 1
        """All layers of a step in one C call (decode_layers.c), where the products are C's and every layer
        shares one norm epsilon and one attention scale; bitwise the per-layer loop of `_native_step`."""
        self.addresses = [[_address(x.input_norm.weight), _address(x.post_norm.weight), _address(x.qkv),
                           _address(x.qkv_bias), _address(x.o), _address(x.o_bias), _address(x.gate_up),
                           _address(x.gate_up_bias), _address(x.down), _address(x.down_bias)]
                          for x in self.layers] if self.fused else []

    @classmethod
    def build(cls, model: nn.Module, kernels: DecodeKernels | None = None) -> DecodeStep | None:
        """The step for `model` (the transformers causal LM, inside `ModelHandle.inference`, its linear
        layers packed), or None where it would not be exactly the model's forward. With `kernels`, the
        step computes the same in C, rounded differently."""
        return None if unsupported_reason(model) else cls(model, kernels)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits [rows, vocabulary] for the token after `tokens` [rows]; `mask` [rows, positions] covers
        the cache's positions and the new one (1: attended), `positions` [rows] are the new tokens'."""
        if self.fused and _claimable(getattr(cache, "layers", None), len(self.layers), tokens.shape[0]):
            return self._fused_step(tokens, mask, positions, cache.layers)
        if self.native is not None:
            return self._native_step(tokens, mask, positions, cache)
        rows = tokens.shape[0]
        hidden = self.embed(tokens[:, None])
        cos, sin = self.rotary(hidden, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]  # over the heads, as the model's apply_rotary_pos_emb
        attended = mask[:, None, None, :].bool()
        shape = (rows, 1, -1, self.head_dim)
        for index, layer in enumerate(self.layers):
            residual = hidden
            normed = layer.input_norm(hidden)
            qk, v = packed_linear(normed, layer.qkv, layer.qkv_bias).split(self.qk_v, dim=-1)
            qk, v = qk.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin  # q and k side by side: one rotary, each element as before
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            k, v = cache.update(k, v, index)
            out, _ = self.attend(layer.attention, q, k, v, attended, dropout=0.0, scaling=layer.attention.scaling)
            hidden = residual + packed_linear(out.reshape(rows, 1, -1).contiguous(), layer.o, layer.o_bias)
            residual = hidden
            normed = layer.post_norm(hidden)
            gate, up = packed_linear(normed, layer.gate_up, layer.gate_up_bias).split(self.intermediate, dim=-1)
            hidden = residual + packed_linear(layer.act(gate) * up, layer.down, layer.down_bias)
        return packed_linear(self.norm(hidden), self.head, self.head_bias)[:, -1]

    def _native_step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The same layers with everything in C but the products where `product` is oneDNN's: the residual
        stream `hidden` is summed in place, each norm taking the last sub-layer's output `delta` with it, and
        buffers serve every layer."""
        kernels, product, rows, dim = self.native, self.product, tokens.shape[0], self.head_dim
        hidden = self.embed(tokens)  # [rows, width]
        cos, sin = (t.view(rows, dim) for t in self.rotary(hidden, positions[:, None]))
        attended = mask.bool()
        normed = torch.empty_like(hidden)
        q, k = hidden.new_empty((rows, self.heads, 1, dim)), hidden.new_empty((rows, self.kv_heads, 1, dim))
        rotated_q, rotated_k = q.view(rows, self.heads, dim), k.view(rows, self.kv_heads, dim)  # what rotary writes
        activated = hidden.new_empty((rows, self.intermediate))
        delta = None
        for index, layer in enumerate(self.layers):
            kernels.add_rms_norm(hidden, delta, layer.input_norm.weight, normed, layer.input_norm.variance_epsilon)
            qkv = product(normed, layer.qkv, layer.qkv_bias)
            kernels.rotary(qkv, cos, sin, rotated_q, rotated_k)
            keys, values = cache.update(k, qkv[:, self.qk_v[0] :].view(rows, self.kv_heads, 1, dim), index)
            out = kernels.attention(q, keys, values, attended, layer.attention.scaling)
            delta = product(out.view(rows, -1), layer.o, layer.o_bias)
            kernels.add_rms_norm(hidden, delta, layer.post_norm.weight, normed, layer.post_norm.variance_epsilon)
            kernels.silu_mul(product(normed, layer.gate_up, layer.gate_up_bias), activated)
            delta = product(activated, layer.down, layer.down_bias)
        kernels.add_rms_norm(hidden, delta, self.norm.weight, normed, self.norm.variance_epsilon)
        return product(normed, self.head, self.head_bias)

    def _fused_step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                    caches: list) -> torch.Tensor:
        """`_native_step` with its loop over the layers in C: each cache claims the new position, which the C
        loop writes."""
        kernels, rows, dim = self.native, tokens.shape[0], self.head_dim
        slot = [layer.claim_slot() for layer in caches][0]  # every layer has the same length (`_claimable`)
        hidden = self.embed(tokens)
        cos, sin = (t.reshape(rows, dim).contiguous() for t in self.rotary(hidden, positions[:, None]))
        new = hidden.new_empty
        buffers = {"delta": torch.empty_like(hidden), "normed": torch.empty_like(hidden),
                   "qkv": new((rows, sum(self.qk_v))), "q": new((rows, self.heads, dim)),
                   "k": new((rows, self.kv_heads, dim)), "out": new((rows, self.heads * dim)),
                   "gate_up": new((rows, 2 * self.intermediate)), "act": new((rows, self.intermediate))}
        table = []
        for static, layer in zip(self.addresses, caches, strict=True):
            table += static + [layer.keys.data_ptr(), layer.values.data_ptr()]
        kernels.decode_layers((ctypes.c_uint64 * len(table))(*table), hidden, buffers, cos, sin, mask.bool(), slot,
                              caches[0].keys.stride()[:3], self.heads, self.kv_heads,
                              self.layers[0].attention.scaling, self.eps)
        kernels.add_rms_norm(hidden, buffers["delta"], self.norm.weight, buffers["normed"], self.eps)
        return self.product(buffers["normed"], self.head, self.head_bias)


def _address(value: Any) -> int:
    """Where a weight (a tensor or a `PackedWeight`) or a bias starts; 0 for no bias."""
    if value is None:
        return 0
    tensor = getattr(value, "data", value)
    if tensor.dtype != torch.bfloat16 or not tensor.is_contiguous():
        raise ValueError(f"decode_layers reads contiguous bf16 weights, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.data_ptr()


def _claimable(caches: list | None, layers: int, rows: int) -> bool:
    """Whether the C loop can write this step's keys and values: one cache a layer that lets a caller claim the
    next position (engines/kvcache.py's preallocated layers), all of `rows` rows at the same length, laid out
    alike (keys and values)."""
    if not caches or len(caches) != layers or not all(hasattr(c, "claim_slot") and c.is_initialized
                                                      for c in caches):
        return False
    first = caches[0].keys
    return all(c.length == caches[0].length and c.keys.shape[0] == rows and c.keys.dtype == torch.bfloat16
               and c.keys.stride() == first.stride() and c.values.stride() == first.stride() for c in caches)


def _linears(model: nn.Module) -> list[PackedLinear]:
    layers = [model.lm_head]
    for layer in model.model.layers:
        layers += [getattr(layer.self_attn, f"{n}_proj") for n in "qkvo"]
        layers += [getattr(layer.mlp, f"{n}_proj") for n in ("gate", "up", "down")]
    return layers


def _kernels_compute(model: nn.Module) -> bool:
    """Whether the C kernels' activation and norms are the model's: SiLU gating, and the RMSNorm of the
    architectures in `SUPPORTED` (a weight and an epsilon, computed in fp32 and rounded before the weight)."""
    norms = [model.model.norm]
    for layer in model.model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    return getattr(model.config, "hidden_act", None) == "silu" and all(
        hasattr(n, "variance_epsilon") and getattr(n, "weight", None) is not None for n in norms)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
