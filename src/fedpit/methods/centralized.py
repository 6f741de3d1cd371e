"""Centralized: every client's data pooled and trained in one place, the FedPIT paper's upper
reference for utility (and, the paper finds, the one that leaks most). Not federated: the
runtime hands this method a single client holding all examples.

The paper trains 10 epochs in all; fedpit spreads exactly that many over the configured rounds
(as evenly as possible, earlier rounds first; a round whose share is zero keeps the adapter), so the
same config compares with the federated methods round by round and the cosine learning-rate decay
over rounds acts as a decay over epochs. With federation.rounds = 1 it is one 10-epoch run.
"""

from __future__ import annotations

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


def epochs_in_round(total: int, rounds: int, round_num: int) -> int:
    """Epochs trained in `round_num` (1-based) so that rounds 1..rounds add up to exactly `total`."""
    def done_after(r: int) -> int:  # ceil(r * total / rounds), in integers
        return -(-r * total // rounds)

    return done_after(round_num) - done_after(round_num - 1)


@METHODS.register("centralized")
class Centralized(Method):
    name = "centralized"
    Options = CentralizedOptions
    pools_clients = True

    def private_passes(self, round_num: int) -> list[int]:
        epochs = epochs_in_round(self.options.epochs, self.config.federation.rounds, round_num)
        return [epochs] if epochs else []

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        epochs = epochs_in_round(self.options.epochs, self.config.federation.rounds, ctx.round)
        if epochs == 0:  # this round's share of the epochs is zero: nothing to train
            upload = ctx.upload(dict(global_adapter), train_loss_private=float("nan"), epochs=0)
        else:
            adapter, result = ctx.train(global_adapter, ctx.examples, "private", epochs=epochs)
            upload = ctx.upload(adapter, train_loss_private=result.mean_loss, epochs=epochs)
        return ClientResult(upload=upload, state=ctx.state, phase_seconds=ctx.phase_seconds)

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        return weighted_average(uploads)
