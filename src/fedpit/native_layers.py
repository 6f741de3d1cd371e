"""A bf16 model's RMSNorms and gated MLP activations on the C kernels of native/, inside an inference block.

A prefill (generation's prompts, IFS and loss scoring) runs the model's own forward over many tokens at once.
There transformers' RMSNorm is eight torch operations (casts, square, mean, rsqrt, products) and the MLP's
activation two (SiLU, then the product with up), each a pass over [tokens, width] with a new tensor: about a
tenth of the bench round's prefill time besides the products. `rms_norm` and `silu_mul_pair` (decode_ops.c)
do each in one threaded pass, rounding where torch's bf16 operations round, as the decode step's do.

The swap is made where the decode step's kernels compute the model's own layers (`decode_step.SUPPORTED`
architectures, SiLU gating) and undone when the block ends (`packed.unpack`). The swapped modules keep the
attributes the decode step reads (`weight`, `variance_epsilon`; the MLP's projections and `act_fn`), and
anything that is not a bf16 CPU tensor goes to the original module.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpit.decode_step import SUPPORTED
from fedpit.native.kernels import DecodeKernels


class NativeRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module, kernels: DecodeKernels) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon
        self.kernels = kernels
        self._original = (norm,)  # a tuple: not registered as a submodule, so its weight is not listed twice

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype != torch.bfloat16 or hidden.device.type != "cpu" or self.weight.dtype != torch.bfloat16:
            return self._original[0](hidden)
        rows = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        out = torch.empty_like(rows)
        self.kernels.rms_norm(rows, self.weight, out, self.variance_epsilon)
        return out.view(hidden.shape)


class NativeGatedMLP(nn.Module):
    """down(silu(gate(x)) · up(x)) with the activation and product in one C pass."""

    def __init__(self, mlp: nn.Module, kernels: DecodeKernels) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype != torch.bfloat16 or gate.device.type != "cpu" or up.dtype != torch.bfloat16:
            return self.down_proj(self.act_fn(gate) * up)
        inner = gate.shape[-1]
        gate, up = gate.reshape(-1, inner).contiguous(), up.reshape(-1, inner).contiguous()
        activated = torch.empty_like(gate)
        self.kernels.silu_mul_pair(gate, up, activated)
        return self.down_proj(activated.view(*x.shape[:-1], inner))


def swap_native_layers(model: nn.Module, kernels: DecodeKernels) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap `model`'s norms and MLPs for the native ones where the kernels compute them; (parent, attribute,
    original) of each swap, for `packed.unpack`. Nothing is swapped for other architectures."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config, inner = getattr(base, "config", None), getattr(base, "model", None)
    if getattr(config, "model_type", None) not in SUPPORTED or getattr(config, "hidden_act", None) != "silu" \
            or inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        return []
    targets = [(inner, "norm")]
    for layer in inner.layers:
        targets += [(layer, "input_layernorm"), (layer, "post_attention_layernorm"), (layer, "mlp")]
    if not all(_swappable(getattr(parent, attr, None), attr) for parent, attr in targets):
        return []
    swapped = []
    for parent, attr in targets:
        original = getattr(parent, attr)
        setattr(parent, attr, NativeGatedMLP(original, kernels) if attr == "mlp" else NativeRMSNorm(original, kernels))
        swapped.append((parent, attr, original))
    return swapped


def _swappable(module: nn.Module | None, attr: str) -> bool:
    if attr == "mlp":
        return all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    return module is not None and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None
