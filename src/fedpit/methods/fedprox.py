"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) over LoRA.

Local training adds the proximal term (mu / 2) * ||w - w_g||^2 over the adapter, which keeps
clients with skewed data from drifting far from the global adapter. mu = 0 is FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedpit.errors import ConfigError
from fedpit.methods.aggregation import weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method, train_private
from fedpit.types import AdapterState, ClientResult, ClientUpload


@dataclass(frozen=True)
class FedProxOptions:
    mu: float = 0.01
    """Weight of the proximal term."""

    def validate(self) -> None:
        if self.mu < 0:
            raise ConfigError(f"method.mu must be >= 0, got {self.mu}")


def proximal_term(anchor: AdapterState, mu: float):
    def term(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        return (mu / 2.0) * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())

    return term


@METHODS.register("fedprox")
class FedProx(Method):
    name = "fedprox"
    Options = FedProxOptions
    mean_aggregation = True

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        anchor = {k: v.to(ctx.handle.device) for k, v in global_adapter.items()}
        return train_private(ctx, global_adapter, extra_loss=proximal_term(anchor, self.options.mu))

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        return weighted_average(uploads)
