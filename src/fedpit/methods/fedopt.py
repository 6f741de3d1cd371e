"""The FedOPT family (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): the server
treats the change of the averaged adapter as a pseudo-gradient and applies an optimiser to it.

FedAvgM (server momentum, Hsu et al. 2019), FedAdagrad, FedAdam and FedYogi share one class,
parametrised by the rule; clients train exactly as in FedAvg. Optimiser moments live in
`server_state` between rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedpit.errors import ConfigError
from fedpit.methods.aggregation import weighted_average
from fedpit.methods.base import METHODS, ClientContext, Method, train_private
from fedpit.types import AdapterState, ClientResult, ClientUpload


@dataclass(frozen=True)
class MomentumOptions:
    server_lr: float = 1.0
    momentum: float = 0.9

    def validate(self) -> None:
        if self.server_lr <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("method.server_lr must be > 0 and method.momentum within [0, 1)")


@dataclass(frozen=True)
class AdaptiveOptions:
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    """Adaptivity: larger tau makes the update closer to plain momentum."""

    def validate(self) -> None:
        if self.server_lr <= 0 or self.tau <= 0:
            raise ConfigError("method.server_lr and method.tau must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("method.beta1 and method.beta2 must be within [0, 1)")


Rule = Callable[[Any, dict[str, torch.Tensor], torch.Tensor, str], torch.Tensor]


def momentum_rule(opts: MomentumOptions, state: dict[str, torch.Tensor], delta: torch.Tensor, key: str) -> torch.Tensor:
    m = opts.momentum * state.get(f"m/{key}", torch.zeros_like(delta)) + delta
    state[f"m/{key}"] = m
    return opts.server_lr * m


def _adaptive(second_moment: Callable[[AdaptiveOptions, torch.Tensor, torch.Tensor], torch.Tensor]) -> Rule:
    def rule(opts: AdaptiveOptions, state: dict[str, torch.Tensor], delta: torch.Tensor, key: str) -> torch.Tensor:
        m = opts.beta1 * state.get(f"m/{key}", torch.zeros_like(delta)) + (1 - opts.beta1) * delta
        v = second_moment(opts, state.get(f"v/{key}", torch.full_like(delta, opts.tau**2)), delta)
        state[f"m/{key}"], state[f"v/{key}"] = m, v
        return opts.server_lr * m / (v.sqrt() + opts.tau)

    return rule


adagrad_rule = _adaptive(lambda o, v, d: v + d**2)
adam_rule = _adaptive(lambda o, v, d: o.beta2 * v + (1 - o.beta2) * d**2)
yogi_rule = _adaptive(lambda o, v, d: v - (1 - o.beta2) * d**2 * torch.sign(v - d**2))


class FedOpt(Method):
    """Clients as in FedAvg; the server steps x <- x + update(mean(uploads) - x)."""

    rule: ClassVar[Rule]
    mean_aggregation = True

    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult:
        return train_private(ctx, global_adapter)

    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState:
        average = weighted_average(uploads)
        moments = server_state.setdefault("optimizer", {})
        return {k: global_adapter[k] + type(self).rule(self.options, moments, average[k] - global_adapter[k], k)
                for k in global_adapter}


_RULES = (
    ("fedavgm", momentum_rule, MomentumOptions),
    ("fedadagrad", adagrad_rule, AdaptiveOptions),
    ("fedadam", adam_rule, AdaptiveOptions),
    ("fedyogi", yogi_rule, AdaptiveOptions),
)
for _name, _rule, _options in _RULES:
    _attributes = {"name": _name, "rule": staticmethod(_rule), "Options": _options, "__module__": __name__}
    METHODS.register(_name)(type(f"FedOpt_{_name}", (FedOpt,), _attributes))
