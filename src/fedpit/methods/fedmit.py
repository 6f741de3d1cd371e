"""FedMIT, the FedPIT paper's ablation (Zhang et al. 2024, arXiv 2403.06131): self-generated data
WITHOUT isolation -- one adapter trained from W_g on private and selected synthetic samples
mixed together, uploaded as is. The paper finds it does not reduce leakage.

Selection is FedPIT's: a private-only adapter is trained to score IFS (it stays on the client and
is not uploaded), then the single mixed update is trained from the global adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpit.errors import ConfigError
from fedpit.methods.aggregation import weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method
from fedpit.methods.selection import select_by_ifs
from fedpit.types import AdapterState, ClientResult, ClientUpload


@dataclass(frozen=True)
class FedMITOptions:
    keep: int = 16
    """M: candidates with the lowest IFS mixed into the private data."""

    def validate(self) -> None:
        if self.keep <= 0:
            raise ConfigError(f"method.keep must be > 0, got {self.keep}")


@METHODS.register("fedmit")
class FedMIT(Method):
    name = "fedmit"
    Options = FedMITOptions
    uses_synthetic = True
    mean_aggregation = True

    def private_passes(self, round_num: int) -> list[int]:
        return [self.config.train.epochs] * 2  # the IFS scorer, then the mixed adapter

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        synth = ctx.self_generate(global_adapter)
        scorer, _ = ctx.train(global_adapter, ctx.examples, "scorer")
        selected = select_by_ifs(ctx, scorer, synth, self.options.keep)
        mixed, result = ctx.train(global_adapter, ctx.examples + selected, "mixed")
        counts = synth.counts()
        upload = ctx.upload(mixed, train_loss_private=result.mean_loss, synthetic_kept=len(selected),
                            **{f"synthetic_{k}": v for k, v in counts.items()})
        return ClientResult(upload=upload, state=ctx.state, synthetic=synth.samples,
                            phase_seconds=ctx.phase_seconds)

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        return weighted_average(uploads)
