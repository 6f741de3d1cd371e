"""LoRA dropout with a cheaper random mask.

peft puts an `nn.Dropout` before every LoRA layer's A; with LoRA on all 7 projections of SmolLM2 that is
210 masks of a whole activation per forward, and drawing them (`bernoulli_`, one random float per
element) was 14% of a CPU training step (a torch profile of `make bench`'s training workload). Here a
mask element is a 16-bit slice of a 64-bit random integer: a quarter of the random draws, and a
comparison instead of a float conversion. An element is dropped with probability round(p * 65536) / 65536
(within 8e-6 of p) and the kept ones are scaled by the inverse of the keep probability that is really
used, so the layer is unbiased exactly as inverted dropout is. It draws from torch's default generator,
so `torch.manual_seed` makes training reproducible as before.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16


class FastDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropped_levels = round(p * _LEVELS)
        self.keep_scale = _LEVELS / (_LEVELS - self.dropped_levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped_levels == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(1 << 63), None)
        slices = words.view(torch.int16)[:n].view(x.shape)
        dropped = slices < (self.dropped_levels - (1 << 15))
        return x.masked_fill(dropped, 0).mul_(self.keep_scale)

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
