"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020) over LoRA adapters.

Each client keeps its control variate c_i (private state, never sent); the server keeps c and
broadcasts it. Local training corrects every gradient by (c - c_i): the loss gets the term
<w - stopgrad(w), c - c_i>, whose value is 0 (reported losses stay the plain LM loss) and whose
gradient is exactly the correction. Clients upload y_i and delta c_i; the server averages the
adapters (weighted, as FedAvg) and sets c += (|S| / N) * mean(delta c_i), N = all clients.

Adaptation to AdamW. The paper's option II, c_i+ = c_i - c + (x - y_i) / (K * lr), is under
plain SGD exactly the mean of the K local data-loss gradients, since then
x - y_i = lr * sum_k (g_k + c - c_i). Under AdamW the model delta is made of normalised steps of
about lr per coordinate, so that formula yields variates in "Adam step" units, tens of times the
real gradients, and the correction then swamps the data gradient (and grows round after round).
fedpit therefore measures option II's value directly by default (`variate = "gradient"`): c_i+ is
the mean data-loss gradient over the local steps, as the training loop used it (under DP-SGD the
clipped, noised one, so c_i is as private as the adapter), so c and c_i
stay in gradient units like the gradients they correct. `variate = "delta"` keeps the paper's
formula literally. Either way the corrected gradient then goes through AdamW (and clipping),
not plain SGD. The variates cover the LoRA A and B tensors only; the base model is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedpit.errors import ConfigError
from fedpit.methods.aggregation import weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method
from fedpit.types import AdapterState, ClientResult, ClientUpload

DELTA = "scaffold_delta_c"
STATE = "scaffold_c"
VARIATES = ("gradient", "delta")


@dataclass(frozen=True)
class ScaffoldOptions:
    variate: str = "gradient"
    """How c_i is refreshed: "gradient" = mean local data gradient (option II's value, measured);
    "delta" = option II's formula from the model delta, K and lr (inflated under AdamW)."""

    def validate(self) -> None:
        if self.variate not in VARIATES:
            raise ConfigError(f"method.variate must be one of {', '.join(VARIATES)}, got '{self.variate}'")


def _zeros_like(adapter: AdapterState) -> AdapterState:
    return {k: torch.zeros_like(v) for k, v in adapter.items()}


def control_update(c_i: AdapterState, c: AdapterState, global_adapter: AdapterState, local: AdapterState,
                   steps: int, lr: float) -> AdapterState:
    """Option II of the paper: c_i+ = c_i - c + (x - y_i) / (K * lr)."""
    scale = 1.0 / (max(steps, 1) * lr)
    return {k: c_i[k] - c[k] + (global_adapter[k] - local[k]) * scale for k in c_i}


def server_control_update(c: AdapterState, deltas: list[AdapterState], num_clients: int) -> AdapterState:
    """c += (|S| / N) * mean(delta c_i) = (1 / N) * sum(delta c_i)."""
    return {k: c[k] + sum(d[k] for d in deltas) / num_clients for k in c}


def correction_term(correction: dict[str, torch.Tensor]):
    """Loss term with value 0 and gradient `correction[k]` for every parameter k."""
    def term(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        return sum(((p - p.detach()) * correction[k]).sum() for k, p in params.items())

    return term


@METHODS.register("scaffold")
class Scaffold(Method):
    name = "scaffold"
    Options = ScaffoldOptions

    def broadcast(self, server_state: dict[str, Any]) -> dict[str, AdapterState]:
        return {"c": server_state["c"]} if "c" in server_state else {}

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        c = ctx.broadcast.get("c") or _zeros_like(global_adapter)
        c_i = ctx.state.tensors.get(STATE) or _zeros_like(global_adapter)
        params = ctx.handle.lora_params
        correction = {k: (c[k] - c_i[k]).to(p.device, p.dtype) for k, p in params.items()}
        local, result = ctx.train(global_adapter, ctx.examples, "private", extra_loss=correction_term(correction),
                                  record_gradient=True)
        if self.options.variate == "gradient":
            new_c_i = {k: g.cpu() for k, g in result.gradient_mean.items()}
        else:
            new_c_i = control_update(c_i, c, global_adapter, local, result.steps, ctx.learning_rate)
        ctx.state.tensors[STATE] = new_c_i
        delta = {k: new_c_i[k] - c_i[k] for k in c_i}
        upload = ClientUpload(client=ctx.client, tensors=local, num_examples=len(ctx.examples),
                              metrics={"train_loss_private": float(result.mean_loss)}, extras={DELTA: delta})
        return ClientResult(upload=upload, state=ctx.state, phase_seconds=ctx.phase_seconds)

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        c = server_state.get("c") or _zeros_like(global_adapter)
        num_clients = server_state.get("num_clients", len(uploads))
        server_state["c"] = server_control_update(c, [u.extras[DELTA] for u in uploads], num_clients)
        return weighted_average(uploads)
