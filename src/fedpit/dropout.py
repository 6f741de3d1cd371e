"""LoRA dropout that draws random numbers only for the elements it drops.

peft puts an `nn.Dropout` before every LoRA layer's A; with LoRA on all 7 projections of SmolLM2 that is
210 masks of a whole activation per forward, and drawing them (`bernoulli_`, one random float per
element) was 14% of a CPU training step (a torch profile of `make bench`'s training workload).

At LoRA's usual p (0.05) nearly every element is kept, so here the dropped positions are drawn directly:
the gaps between consecutive dropped elements of a Bernoulli(p) sequence are independent geometric
variables, floor(log(U) / log(1 - p)) for uniform U, and their running sum gives the positions. That is
about p·n random numbers instead of n, and the mask is exactly Bernoulli(p) per element (not rounded to a
grid of probabilities). Kept elements are scaled by 1 / (1 - p), as inverted dropout does, and the
backward pass is one scaled copy of the gradient with the same positions zeroed, where masking then
scaling took two passes. Draws come from torch's default generator, so `torch.manual_seed` makes training
reproducible as before. The cost grows with p: at p = 0.5 it draws half as many numbers as elements.
Off the CPU the layer is torch's own dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Flat indices in [0, n) of the elements a Bernoulli(p) mask drops, in increasing order."""
    log_keep = math.log1p(-p)
    spans, end = [torch.empty(0, dtype=torch.float64)], 0.0
    while end < n:  # one draw almost always suffices: it holds 8 standard deviations more gaps than n has drops
        remaining = n - end
        count = int(remaining * p + 8 * math.sqrt(remaining * p) + 16)
        uniform = torch.rand(count, dtype=torch.float64)
        # a gap of g kept elements then one dropped; 1 - U lies in (0, 1], so the log is finite
        steps = torch.floor(torch.log1p(-uniform) / log_keep).add_(1)
        positions = steps.cumsum_(0).add_(end - 1)
        spans.append(positions)
        end = float(positions[-1]) + 1
    positions = torch.cat(spans)
    return positions[positions < n].long()


class _ZeroAndScale(torch.autograd.Function):
    """x · scale with `positions` (flat) zeroed; the gradient is the same operation on the output's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return _zero_and_scale(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (positions,) = ctx.saved_tensors
        return _zero_and_scale(grad, positions, ctx.scale), None, None


def _zero_and_scale(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    out = x.mul(scale).contiguous()  # contiguous: flat positions then index the tensor's logical order
    out.view(-1).index_fill_(0, positions, 0)
    return out


class FastDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.keep_scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":  # a GPU draws a number per element cheaply; positions would come from the host
            return nn.functional.dropout(x, self.p, training=True)
        positions = dropped_positions(x.numel(), self.p)
        return _ZeroAndScale.apply(x, positions, self.keep_scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every peft LoRA dropout (`lora_dropout[...]`, an `nn.Dropout`) for a `FastDropout` of the same
    probability; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                dropouts[name] = FastDropout(dropout.p)
                swapped += 1
    return swapped
