"""LocIT and LocIT+SG, the FedPIT paper's no-federation baselines (Zhang et al. 2024): each client
tunes alone and uploads nothing; the global adapter never changes. Each client's adapter is its
private state, evaluated as a personalised model after the last round.

LocIT+SG adds self-generation with the client's own adapter: candidates are scored by IFS with
the private-only adapter and the selected ones are trained together with the private data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpit.errors import ConfigError
from fedpit.methods.base import METHODS, ClientContext, Method
from fedpit.methods.selection import select_by_ifs
from fedpit.types import AdapterState, ClientResult, ClientUpload


@dataclass(frozen=True)
class LocalOptions:
    """LocIT has no options of its own."""


@dataclass(frozen=True)
class LocalSGOptions:
    keep: int = 16

    def validate(self) -> None:
        if self.keep <= 0:
            raise ConfigError(f"method.keep must be > 0, got {self.keep}")


class _Alone(Method):
    """Shared server rule: nothing arrives, the global adapter stays as it is."""

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        return global_adapter

    @staticmethod
    def _finish(ctx: ClientContext, adapter: AdapterState, **metrics: float) -> ClientResult:
        ctx.state.tensors["private"] = adapter
        upload = ctx.upload({}, **metrics)  # nothing is shared
        return ClientResult(upload=upload, state=ctx.state, phase_seconds=ctx.phase_seconds,
                            audit={"private": adapter})


@METHODS.register("local")
class LocIT(_Alone):
    name = "local"
    Options = LocalOptions

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        start = ctx.state.tensors.get("private", global_adapter)
        adapter, result = ctx.train(start, ctx.examples, "private")
        return self._finish(ctx, adapter, train_loss_private=result.mean_loss)


@METHODS.register("local_sg")
class LocITSG(_Alone):
    name = "local_sg"
    Options = LocalSGOptions
    uses_synthetic = True

    def private_passes(self, round_num: int) -> list[int]:
        return [self.config.train.epochs] * 2  # the IFS scorer, then private + selected synthetic

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        start = ctx.state.tensors.get("private", global_adapter)
        synth = ctx.self_generate(start)
        scorer, _ = ctx.train(start, ctx.examples, "scorer")
        selected = select_by_ifs(ctx, scorer, synth, self.options.keep)
        adapter, result = ctx.train(start, ctx.examples + selected, "private")
        result_ = self._finish(ctx, adapter, train_loss_private=result.mean_loss, synthetic_kept=len(selected),
                               **{f"synthetic_{k}": v for k, v in synth.counts().items()})
        result_.synthetic = synth.samples
        return result_
