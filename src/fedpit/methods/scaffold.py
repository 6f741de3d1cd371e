"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020) over LoRA adapters.

Each client keeps its control variate c_i (private state, never sent); the server keeps c and
broadcasts it. Local training corrects every gradient by (c - c_i), added here as the loss term
<w, c - c_i> whose gradient is exactly that correction. Adaptation: fedpit trains with AdamW, so
the correction passes through Adam's normalisation rather than plain SGD as in the paper; the
option-II variate update c_i+ = c_i - c + (x - y_i) / (K * lr) uses the K local steps and the
round's learning rate. Clients upload y_i and delta c_i; the server averages the adapters
(weighted, as FedAvg) and sets c += (|S| / N) * mean(delta c_i).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedpit.methods.aggregation import weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method
from fedpit.types import AdapterState, ClientResult, ClientUpload

DELTA = "scaffold_delta_c"


@dataclass(frozen=True)
class ScaffoldOptions:
    """SCAFFOLD has no options beyond the shared training settings."""


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


@METHODS.register("scaffold")
class Scaffold(Method):
    name = "scaffold"
    Options = ScaffoldOptions

    def broadcast(self, server_state: dict[str, Any]) -> dict[str, AdapterState]:
        return {"c": server_state["c"]} if "c" in server_state else {}

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        c = ctx.broadcast.get("c") or _zeros_like(global_adapter)
        c_i = ctx.state.tensors.get("scaffold_c") or _zeros_like(global_adapter)
        correction = {k: (c[k] - c_i[k]).to(ctx.handle.device) for k in c}

        def corrected(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
            return sum((p * correction[k]).sum() for k, p in params.items())

        local, result = ctx.train(global_adapter, ctx.examples, "private", extra_loss=corrected)
        new_c_i = control_update(c_i, c, global_adapter, local, result.steps, ctx.learning_rate)
        ctx.state.tensors["scaffold_c"] = new_c_i
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
