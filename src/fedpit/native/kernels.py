"""A bf16 decode step's attention, element-wise work and linear layers on a CPU, and a bf16 prefill's softmax, norms
and activation, in C compiled at first use (build.py).

Why the attention: in a bf16 decode step of SmolLM2 (8 rows, ~300 tokens of context, 2 cores) torch's SDPA
took about 285 µs a layer, a quarter of the step, for a computation that reads under 1 MB. Its CPU kernel
runs one small matrix product per (row, head) pair through a general bf16 GEMM, whose per-call cost is most
of the time. `decode_attention.c` takes each (row, key/value head) in one pass: the query heads that share a
key/value head together, fp32 arithmetic, keys four at a time: about 115 µs for that layer, 270 against
640 µs at 16 rows and 380 tokens. Its output is not bitwise SDPA's (the sums run in another order); it is as
close to an fp64 reference as SDPA's (tested). On AVX512-BF16, SmolLM2's head size and grouping take q·k with
`vdpbf16ps` on the keys as stored: a decode step 1.08x faster at 8 and at 16 rows, not significantly at one
(`python benchmarks/kernels_ab.py --base 9771f7e`).

Why the element-wise work: with the attention and the products fast, a quarter of that step was the ~30
small torch operations a layer around them (RMSNorm alone is 8: casts, square, mean, rsqrt, products),
each a dispatch from Python over a few thousand numbers. `decode_ops.c` does a norm with its residual sum,
the rotary embedding of q and k, and the MLP's SiLU-and-product in one call each, rounding where torch's
bf16 operations round (the rotary embedding and the residual sum bitwise; tested against torch).

Why the linear layers: oneDNN's bf16 product, given a decode step's few rows, streamed SmolLM2's weights at
about 19 GB/s (8 rows; this machine's memory gives about 50), and its 120 calls a step were half the step.
`decode_linear.c` packs each weight once per inference block for `vdpbf16ps` and keeps every row's sums in
registers while the weight streams past: a decode step 1.41x faster at 8 rows, 1.21x at 16, 1.69x at one
(`benchmarks/decode_profile.py --products c|onednn`; `generation_ab.py --lever c_linear` on whole
generations). It needs AVX512-BF16; elsewhere `linear_available` is False and the step keeps oneDNN's
products. Its sums run in another order than oneDNN's, so its output is as close to an exact product as
`F.linear`'s, not bitwise it (tested).

Why the step's layers in one call (`decode_layers.c`): with everything in C, about 2 ms of an 8-row step of
15 ms was still the Python around ~10 calls a layer (argument checks, new tensors, ctypes). `decode_layers`
runs the same calls, in the same order, from C, writing each layer's new keys and values into its cache itself:
bitwise the Python loop (tested), the round's generation phase 1.07x (CI 1.05-1.08; `generation_ab.py --lever
layers_call --workload round`). It is used where the products are C's (AVX512-BF16).

Why a prefill's softmax, norms and activation (`masked_softmax`, `rms_norm`, `silu_mul_pair`, threaded over the
prefill's rows): a prefill (generation's prompts, IFS and loss scoring) runs the model's own forward, where the
blocked attention's softmax was five torch passes over the scores (cast, scale, mask, softmax, cast back) and
RMSNorm eight; in the bench round's generation they were ~0.5 s of 3.2 s of prefill. `attention.native_softmax`
and `native_layers.py` use them inside inference blocks: the round's generation 1.06x (CI 1.02-1.10; `--lever
prefill_softmax`), its IFS phase from 1.8 to 1.6 s with the norms, the activation and a one-pass adapter merge
(`benchmarks/round_profile.py`).

No library we can depend on offers these for torch 2.13 on a CPU: torch.compile of the attention was
slower than SDPA (and fails to lower the packed linear layers around the element-wise work), and the CPU
extensions that ship such kernels are built for other torch versions. Without a compiler, or where the
build or the load fails, `load` returns None, logs why once, and the decode step keeps torch's operations.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpit.native.build import build

log = logging.getLogger(__name__)

MAX_DIM, MAX_GROUP = 256, 16  # decode_attention.c's buffers
BF16 = torch.bfloat16
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64

_loaded: dict[Path, DecodeKernels | None] = {}


class DecodeKernels:
    """The functions of the library `build` wrote. Each checks what it is given: a wrong shape, dtype or
    layout raises instead of reaching C."""

    def __init__(self, path: Path) -> None:
        self.path = path
        library = ctypes.CDLL(str(path))
        self._attention = _declare(library.decode_attention, [_POINTER] * 5 + [_SIZE] * 12 + [ctypes.c_float],
                                   ctypes.c_int)
        self._add_rms_norm = _declare(library.add_rms_norm, [_POINTER] * 4 + [_SIZE] * 2 + [ctypes.c_float])
        self._rotary = _declare(library.rotary, [_POINTER, _SIZE] + [_POINTER] * 4 + [_SIZE] * 4)
        self._silu_mul = _declare(library.silu_mul, [_POINTER] * 2 + [_SIZE] * 2)
        self._silu_mul_pair = _declare(library.silu_mul_pair, [_POINTER] * 3 + [_SIZE] * 2)
        self._rms_norm_rows = _declare(library.rms_norm_rows, [_POINTER] * 3 + [_SIZE] * 2 + [ctypes.c_float])
        self._masked_softmax = _declare(library.masked_softmax, [_POINTER] * 2 + [_SIZE] * 7 + [ctypes.c_float],
                                        ctypes.c_int)
        self._pack_linear = _declare(library.pack_linear, [_POINTER] * 2 + [_SIZE] * 2)
        self._linear = _declare(library.decode_linear, [_POINTER, _SIZE, _POINTER, _POINTER, _POINTER] + [_SIZE] * 4,
                                ctypes.c_int)
        self._layers = _declare(library.decode_layers, [_SIZE, _POINTER] + [_SIZE] * 6 + [_POINTER] * 12
                                + [_SIZE] * 5 + [ctypes.c_float] * 2, ctypes.c_int)
        self.linear_available = bool(_declare(library.decode_linear_available, [], ctypes.c_int)())
        """Whether `linear` computes here: the library was built for a CPU with AVX512-BF16."""

    @staticmethod
    def supports(head_dim: int, group: int, dtype: torch.dtype) -> bool:
        """Whether the kernels compute a decode step of these query groups and (even, rotary) head sizes."""
        return dtype == BF16 and 2 <= head_dim <= MAX_DIM and head_dim % 2 == 0 and 1 <= group <= MAX_GROUP

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attended: torch.Tensor,
                  scale: float) -> torch.Tensor:
        """softmax(q·Kᵀ·scale, masked)·V for one new token a row. query [rows, heads, 1, dim]; key, value
        [rows, kv_heads, keys, dim] (views of a cache are fine: only the last dimension must be contiguous);
        attended [rows, keys] bool. Returns [rows, heads, dim]."""
        rows, heads, length, dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        if length != 1 or heads % kv_heads or not 1 <= dim <= MAX_DIM or not 1 <= heads // kv_heads <= MAX_GROUP \
                or query.dtype != BF16:
            raise ValueError(f"decode attention takes one bf16 query a row with head dimension <= {MAX_DIM}; got "
                             f"query {tuple(query.shape)} {query.dtype} over {kv_heads} key/value heads")
        if key.dtype != BF16 or value.dtype != BF16 or key.stride(-1) != 1 or value.stride(-1) != 1:
            raise ValueError("keys and values must be bf16 with a contiguous last dimension")
        if not (query.is_cpu and key.is_cpu and value.is_cpu and attended.is_cpu):
            raise ValueError("the decode kernels take CPU tensors")
        if attended.dtype != torch.bool or tuple(attended.shape) != (rows, keys) or attended.stride(-1) != 1:
            raise ValueError(f"attended must be a bool [rows, keys] = [{rows}, {keys}] mask, got "
                             f"{attended.dtype} {tuple(attended.shape)}")
        query = query.contiguous()
        out = torch.empty((rows, heads, dim), dtype=query.dtype)
        status = self._attention(query.data_ptr(), key.data_ptr(), value.data_ptr(), attended.data_ptr(),
                                 out.data_ptr(), rows, kv_heads, heads // kv_heads, keys, dim,
                                 *key.stride()[:3], *value.stride()[:3], attended.stride(0), scale)
        if status != 0:
            raise MemoryError("decode attention could not allocate its score buffer")
        return out

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     out: torch.Tensor, eps: float) -> None:
        """hidden += delta (in place; none when delta is None), then out = RMSNorm(hidden) · weight, as
        transformers' Llama RMSNorm computes it. hidden, delta, out [rows, dim]; weight [dim]."""
        _check_bf16(hidden, out, weight, *(() if delta is None else (delta,)))
        rows, dim = hidden.shape
        if out.shape != hidden.shape or weight.shape != (dim,) or (delta is not None and delta.shape != hidden.shape):
            raise ValueError(f"add_rms_norm: hidden {tuple(hidden.shape)}, delta "
                             f"{None if delta is None else tuple(delta.shape)}, weight {tuple(weight.shape)}, "
                             f"out {tuple(out.shape)} do not match")
        self._add_rms_norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                           out.data_ptr(), rows, dim, eps)

    def rotary(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor,
               k: torch.Tensor) -> None:
        """q, k [rows, heads, dim] = the rotary embedding of the query and key heads at the start of each row
        of qkv [rows, ≥ (heads_q + heads_k) · dim], with cos, sin [rows, dim]."""
        _check_bf16(qkv, cos, sin, q, k)
        rows, heads_q, dim = q.shape
        heads_k = k.shape[1]
        if qkv.dim() != 2 or qkv.shape[0] != rows or qkv.shape[1] < (heads_q + heads_k) * dim \
                or k.shape != (rows, heads_k, dim) or cos.shape != (rows, dim) or sin.shape != (rows, dim) \
                or dim % 2:
            raise ValueError(f"rotary: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)} do not match")
        self._rotary(qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(),
                     rows, heads_q, heads_k, dim)

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        """out [rows, inner] = silu(gate) · up, where gate_up [rows, 2 · inner] is gate then up."""
        _check_bf16(gate_up, out)
        rows, inner = out.shape
        if gate_up.shape != (rows, 2 * inner):
            raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} is not [rows, 2 x {inner}]")
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, inner)

    def silu_mul_pair(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
        """out = silu(gate) · up, all [rows, inner]: `silu_mul` for a prefill's many rows, threaded."""
        _check_bf16(gate, up, out)
        if gate.dim() != 2 or up.shape != gate.shape or out.shape != gate.shape:
            raise ValueError(f"silu_mul_pair: gate {tuple(gate.shape)}, up {tuple(up.shape)}, out {tuple(out.shape)} "
                             "are not the same [rows, inner]")
        self._silu_mul_pair(gate.data_ptr(), up.data_ptr(), out.data_ptr(), *gate.shape)

    def rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float) -> None:
        """out = RMSNorm(hidden) · weight, hidden and out [rows, dim]: `add_rms_norm` without a residual, for a
        prefill's many rows, threaded."""
        _check_bf16(hidden, weight, out)
        if hidden.dim() != 2 or out.shape != hidden.shape or weight.shape != hidden.shape[1:]:
            raise ValueError(f"rms_norm: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, out "
                             f"{tuple(out.shape)} do not match")
        self._rms_norm_rows(hidden.data_ptr(), weight.data_ptr(), out.data_ptr(), *hidden.shape, eps)

    def masked_softmax(self, scores: torch.Tensor, mask: torch.Tensor | None, length: int, scale: float) -> None:
        """A prefill's attention scores to weights, in place: scores [batch, heads, length, keys] (bf16, as
        q·Kᵀ rounded them; `heads` may be query heads grouped under their key/value head) become
        softmax(scores · scale) over the attended keys, in bf16. mask: bool [batch, 1, length, keys] (a view;
        size-1 batch broadcasts), True = attended; None = causal, the queries being the last `length` keys."""
        _check_bf16(scores)
        batch, heads, queries, keys = scores.shape
        if queries != length or keys < length:
            raise ValueError(f"masked_softmax: scores {tuple(scores.shape)} are not [batch, heads, {length}, keys >= "
                             f"{length}]")
        strides = (0, 0)
        if mask is not None:
            if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) \
                    or tuple(mask.shape[2:]) != (length, keys) or mask.stride(-1) != 1 or not mask.is_cpu:
                raise ValueError(f"masked_softmax: mask must be a bool [{batch}, 1, {length}, {keys}] view with "
                                 f"contiguous keys, got {mask.dtype} {tuple(mask.shape)} strides {mask.stride()}")
            strides = (mask.stride(0) if mask.shape[0] == batch else 0, mask.stride(2))
        status = self._masked_softmax(scores.data_ptr(), None if mask is None else mask.data_ptr(),
                                      batch * heads * length, heads * length, length, keys, *strides, keys - length,
                                      scale)
        if status != 0:
            raise MemoryError("masked_softmax could not allocate its row buffers")

    def pack_linear(self, weight: torch.Tensor) -> PackedWeight:
        """`weight` [out, in] (bf16, an even number of inputs) in the layout `linear` reads: a copy, made once
        for the many steps that read it."""
        _check_bf16(weight)
        out_features, in_features = weight.shape
        if in_features % 2:
            raise ValueError(f"pack_linear needs an even number of inputs, got a weight of shape {tuple(weight.shape)}")
        packed = weight.new_empty((-(-out_features // 16) * 16 * in_features,))
        self._pack_linear(weight.data_ptr(), packed.data_ptr(), out_features, in_features)
        return PackedWeight(packed, out_features, in_features)

    def linear(self, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, in] · weightᵀ + bias, [rows, out] in bf16 (`F.linear`'s arithmetic, the sums in another
        order). x may be a view whose rows are spaced apart; its last dimension must be contiguous."""
        if not self.linear_available:
            raise RuntimeError("the C linear layer was built for a CPU without AVX512-BF16; use F.linear")
        if x.dim() != 2 or x.shape[1] != weight.in_features or x.stride(1) != 1 or x.stride(0) % 2 \
                or x.dtype != BF16 or not x.is_cpu:
            raise ValueError(f"linear: x must be a bf16 CPU [rows, {weight.in_features}] with contiguous rows at an "
                             f"even stride, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
        if bias is not None:
            _check_bf16(bias)
            if bias.shape != (weight.out_features,):
                raise ValueError(f"linear: bias {tuple(bias.shape)} is not [{weight.out_features}]")
        out = x.new_empty((x.shape[0], weight.out_features))
        self._linear(x.data_ptr(), x.stride(0), weight.data.data_ptr(), None if bias is None else bias.data_ptr(),
                     out.data_ptr(), weight.out_features, x.shape[0], weight.out_features, weight.in_features)
        return out

    LAYER_FIELDS = 12
    """Addresses per layer in `decode_layers`' table: input norm, post-attention norm, qkv, its bias, o, its bias,
    gate_up, its bias, down, its bias, the layer's key cache, its value cache (decode_layers.c)."""

    def decode_layers(self, table: ctypes.Array, hidden: torch.Tensor, buffers: dict[str, torch.Tensor],
                      cos: torch.Tensor, sin: torch.Tensor, attended: torch.Tensor, slot: int,
                      cache_strides: tuple[int, int, int], heads: int, kv_heads: int, scale: float, eps: float) -> None:
        """Every layer of a decode step at once (`DecodeStep`'s loop, in C): `hidden` [rows, width] becomes the
        residual stream after the last layer, whose output not yet added is left in buffers["delta"]. `table`
        holds LAYER_FIELDS addresses a layer (weights packed by `pack_linear`, caches [rows, kv_heads, capacity,
        dim] with `cache_strides`; the new keys and values are written at `slot`). buffers: delta, normed, qkv, q,
        k, out, gate_up, act, each [rows, ...] as decode_layers.c lists; attended [rows, slot + 1] bool."""
        if not self.linear_available:
            raise RuntimeError("decode_layers needs the C linear layer, built only for CPUs with AVX512-BF16")
        rows, width = hidden.shape
        dim = cos.shape[1]
        inner = buffers["act"].shape[1]
        shapes = {"delta": (rows, width), "normed": (rows, width), "qkv": (rows, (heads + 2 * kv_heads) * dim),
                  "q": (rows, heads, dim), "k": (rows, kv_heads, dim), "out": (rows, heads * dim),
                  "gate_up": (rows, 2 * inner), "act": (rows, inner)}
        _check_bf16(hidden, cos, sin, *buffers.values())
        wrong = [name for name, shape in shapes.items() if tuple(buffers[name].shape) != shape]
        if wrong or cos.shape != (rows, dim) or sin.shape != cos.shape or len(table) % self.LAYER_FIELDS \
                or heads % kv_heads or attended.dtype != torch.bool or tuple(attended.shape) != (rows, slot + 1) \
                or not attended.is_contiguous():
            raise ValueError(f"decode_layers: buffers {wrong or 'fine'}, cos {tuple(cos.shape)}, sin "
                             f"{tuple(sin.shape)}, attended {attended.dtype} {tuple(attended.shape)} for {rows} rows "
                             f"of {width}, {heads} heads over {kv_heads} of {dim}, slot {slot}")
        status = self._layers(len(table) // self.LAYER_FIELDS, table, rows, width, heads, kv_heads, dim, inner,
                              hidden.data_ptr(), *(buffers[name].data_ptr() for name in shapes), cos.data_ptr(),
                              sin.data_ptr(), attended.data_ptr(), attended.stride(0), slot, *cache_strides, scale,
                              eps)
        if status != 0:
            raise MemoryError("decode_layers: a product or the attention refused its sizes or memory")


@dataclass(frozen=True)
class PackedWeight:
    """A linear layer's weight as `DecodeKernels.linear` reads it: blocks of 16 outputs, two inputs a word."""

    data: torch.Tensor
    out_features: int
    in_features: int


def _declare(function, argtypes: list, restype=None):
    function.argtypes, function.restype = argtypes, restype
    return function


def _check_bf16(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if tensor.dtype != BF16 or not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError(f"the decode kernels take contiguous bf16 CPU tensors, got {tensor.dtype} "
                             f"{tuple(tensor.shape)} on {tensor.device} (contiguous: {tensor.is_contiguous()})")


def load(cache: Path) -> DecodeKernels | None:
    """The kernels, built into `cache`/native on first use in this process, or None (the reason logged once)."""
    cache = Path(cache)
    if cache not in _loaded:
        try:
            _loaded[cache] = DecodeKernels(build(cache))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("the native decode kernels are not available (%s); decoding uses torch's operations. "
                        "Install a C compiler with OpenMP (gcc) or set $CC to one, or set "
                        "model.native_decode = false to stop trying.", exc)
            _loaded[cache] = None
    return _loaded[cache]
