"""FedAvg over LoRA weights, i.e. FedIT (Zhang et al., "Towards Building the Federated GPT", 2023).

The shortest method, and the template for new ones: an options dataclass, a client rule that
trains from the global adapter on private data, and the weighted mean on the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpit.methods.aggregation import weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method, train_private
from fedpit.types import AdapterState, ClientResult, ClientUpload


@dataclass(frozen=True)
class FedAvgOptions:
    """FedAvg has no options of its own."""


@METHODS.register("fedavg")
class FedAvg(Method):
    name = "fedavg"
    Options = FedAvgOptions
    mean_aggregation = True

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        return train_private(ctx, global_adapter)

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        return weighted_average(uploads)
