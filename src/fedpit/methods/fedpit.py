"""FedPIT (Zhang et al., "FedPIT: Towards Privacy-preserving and Few-shot Federated Instruction
Tuning", arXiv 2403.06131): self-generated synthetic data, isolated private and synthetic
adapters, and local mixing before upload.

Per round on each client: generate candidates with the global model; train W_l on private data;
score candidates by IFS with W_l and keep the best M; train W_s on them from W_g; upload
W_a = beta * W_l + (1 - beta) * W_s. The server takes the example-weighted mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fedpit.errors import ConfigError
from fedpit.methods.aggregation import mix, weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method
from fedpit.methods.selection import select_by_ifs
from fedpit.types import AdapterState, ClientResult, ClientUpload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedPITOptions:
    beta: float = 0.5
    """Weight of the private adapter in the upload; 1 is FedAvg, 0 shares only synthetic training."""
    keep: int = 16
    """M: candidates with the lowest IFS kept for synthetic training."""
    persistent_private: bool = False
    """Keep W_l on the client between rounds instead of restarting it from W_g (never uploaded)."""
    augmented_local: bool = False
    """Train W_l on private plus the selected synthetic samples (the v1 abstract's variant)."""

    def validate(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"method.beta must be within [0, 1], got {self.beta}")
        if self.keep <= 0:
            raise ConfigError(f"method.keep must be > 0, got {self.keep}")


@METHODS.register("fedpit")
class FedPIT(Method):
    name = "fedpit"
    Options = FedPITOptions
    uses_synthetic = True
    mean_aggregation = True

    def private_passes(self, round_num: int) -> list[int]:
        epochs = self.config.train.epochs
        return [epochs, epochs] if self.options.augmented_local else [epochs]

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        opts: FedPITOptions = self.options
        synth = ctx.self_generate(global_adapter)

        private_start = ctx.state.tensors.get("private", global_adapter) if opts.persistent_private else global_adapter
        w_l, private_run = ctx.train(private_start, ctx.examples, "private")

        selected = select_by_ifs(ctx, w_l, synth, opts.keep)
        if not selected:
            log.warning("client %s round %d: no synthetic sample passed the filters; W_s stays W_g",
                        ctx.client, ctx.round)

        if opts.augmented_local and selected:
            w_l, private_run = ctx.train(private_start, ctx.examples + selected, "augmented")
        if selected:
            w_s, synthetic_run = ctx.train(global_adapter, selected, "synthetic")
            synthetic_loss = synthetic_run.mean_loss
        else:
            w_s, synthetic_loss = dict(global_adapter), float("nan")

        with ctx.phase("mixing"):
            w_a = mix(w_l, w_s, opts.beta)
        if opts.persistent_private:
            ctx.state.tensors["private"] = w_l
        counts = synth.counts()
        upload = ctx.upload(
            w_a, train_loss_private=private_run.mean_loss, train_loss_synthetic=synthetic_loss,
            synthetic_kept=len(selected), **{f"synthetic_{k}": v for k, v in counts.items()},
        )
        return ClientResult(upload=upload, state=ctx.state, synthetic=synth.samples,
                            phase_seconds=ctx.phase_seconds, audit={"private": w_l})

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        return weighted_average(uploads)
