"""bf16 linear layers with their weights pre-packed for oneDNN, for inference on a CPU.

A bf16 `F.linear` on a CPU goes to oneDNN, which reorders the weight into its blocked layout on every
call. In a decode step that reorder costs about as much as the product itself: 30 layers' worth of
SmolLM2's 576x1536 weights took 22 ms for 16 rows as plain `F.linear` and 11 ms with the weights
packed once (an AVX512-BF16 CPU, 2 threads), and a 16-prompt prefill's products ~15% faster. Packing
changes the layout only, not the arithmetic: the outputs are bitwise those of `F.linear` (tested).
fp32 goes to MKL instead, where a packed oneDNN product is faster too but not bitwise equal, so fp32
models are left alone: their greedy output stays token-identical to the plain engine.

The packed copy is made when `ModelHandle.inference()` begins (the merged adapter changes the weights
every round) and dropped when it ends; it costs one more copy of the linear weights meanwhile, and
about 0.1 s of packing for SmolLM2 per block, which a generation earns back in about ten decode steps.
The operators are torch's private ones that `torch.compile` uses for frozen CPU graphs, so
`packing_available` probes them once on a small product and compares bits; where they are missing,
fail, or disagree, layers stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS_HINT = 64  # the product size oneDNN picks a layout for; decode (16 rows) and prefill measured alike
_available: bool | None = None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packing_available() -> bool:
    """Whether this torch build packs bf16 weights and computes exactly `F.linear` with them (once)."""
    global _available
    if _available is None:
        try:
            generator = torch.Generator().manual_seed(0)
            weight = torch.randn(48, 40, generator=generator).bfloat16()
            bias = torch.randn(48, generator=generator).bfloat16()
            x = torch.randn(3, 5, 40, generator=generator).bfloat16()
            with torch.no_grad():
                got = packed_linear(x, pack_weight(weight), bias)
            _available = torch.equal(got, F.linear(x, weight, bias))
        except (RuntimeError, AttributeError, NotImplementedError):
            _available = False
    return _available


class PackedLinear(nn.Module):
    """`linear` with its weight packed; `weight` and `bias` stay readable (tied embeddings, the chunked
    loss read them). Anything the packed product cannot take (gradients, another dtype) goes to `F.linear`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = pack_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)


def packable(module: nn.Module) -> bool:
    """A plain bf16 CPU `nn.Linear` whose weight is frozen (inference reads it, nothing trains it)."""
    return (type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"
            and not module.weight.requires_grad and (module.bias is None or module.bias.dtype == torch.bfloat16))


def pack_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every packable linear layer of `model` for a `PackedLinear`; returns (parent, attribute, layer)
    of each swap so `unpack` can put them back. Nothing is swapped where packing is unavailable."""
    if not packing_available():
        return []
    swapped = []
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if packable(module) and name:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, attr, PackedLinear(module))
                swapped.append((parent, attr, module))
    return swapped


def unpack(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, attr, layer in reversed(swapped):
        setattr(parent, attr, layer)
