"""Centralized: every client's data pooled and trained in one place, the FedPIT paper's upper
reference for utility (and, the paper finds, the one that leaks most). Not federated: the
runtime hands this method a single client holding all examples.

The paper trains 10 epochs; fedpit spreads them over the configured rounds (ceil(epochs/rounds)
per round) so the same config compares with the federated methods round by round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedpit.errors import ConfigError
from fedpit.methods.aggregation import weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method
from fedpit.types import AdapterState, ClientResult, ClientUpload


@dataclass(frozen=True)
class CentralizedOptions:
    epochs: int = 10
    """Total epochs over the pooled data (the paper's 10)."""

    def validate(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"method.epochs must be > 0, got {self.epochs}")


@METHODS.register("centralized")
class Centralized(Method):
    name = "centralized"
    Options = CentralizedOptions
    pools_clients = True

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        epochs = math.ceil(self.options.epochs / self.config.federation.rounds)
        adapter, result = ctx.train(global_adapter, ctx.examples, "private", epochs=epochs)
        upload = ctx.upload(adapter, train_loss_private=result.mean_loss)
        return ClientResult(upload=upload, state=ctx.state, phase_seconds=ctx.phase_seconds)

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        return weighted_average(uploads)
