"""Record-level DP-SGD bookkeeping for one client: the noise it trains with, the secret its noise
and sampling are drawn from, and its privacy spent so far (Opacus accountant history).

The training step itself (clip, noise) is `engines.training`'s; this object only decides its
settings and counts what it spent. Its state travels in the client's private state, versioned by
round like the rest, so a resumed run continues from exactly the budget it had. The secret is a
file of its own in the client's folder, made once: a round that is run again after a crash draws
the same noise and batches, so it releases nothing new, and nobody without the client's folder
(the server included) can reproduce the noise from the config and subtract it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpit.config import Config, DPConfig
from fedpit.engines.training import PrivateSGD
from fedpit.errors import ConfigError
from fedpit.privacy.accounting import History, calibrate, epsilon

SECRET_FILE = "dp-secret"


def planned_steps(passes_per_round: list[list[int]], num_examples: int, batch_size: int, max_steps: int) -> int:
    """DP-SGD steps a client takes over the run: every training on private data is assumed to sample at
    batch_size / n (a training that mixes in synthetic rows samples each private row less often, so it
    spends less than planned). Every round is counted: a client sampled less often spends less."""
    per_epoch = math.ceil(num_examples / batch_size)
    steps = 0
    for passes in passes_per_round:
        for epochs in passes:
            steps += min(per_epoch * epochs, max_steps) if max_steps > 0 else per_epoch * epochs
    return steps


def check_delta(dp: DPConfig, client: str, num_examples: int) -> None:
    if dp.delta >= 1.0 / num_examples:
        raise ConfigError(f"privacy.dp.delta={dp.delta:g} is not below 1/n for client {client} (n={num_examples}: "
                          f"1/n = {1.0 / num_examples:.4g}); a delta that large allows releasing an example "
                          f"outright; set privacy.dp.delta below {1.0 / num_examples:.4g}, e.g. 1e-5")


def noise_multiplier(config: Config, passes_per_round: list[list[int]], client: str, num_examples: int) -> float:
    """The configured noise, or the noise calibrated so the client's epsilon after the last round is the target."""
    dp = config.privacy.dp
    check_delta(dp, client, num_examples)
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    steps = planned_steps(passes_per_round, num_examples, config.train.batch_size, config.train.max_steps)
    if steps == 0:
        raise ConfigError(f"privacy.dp is enabled but method '{config.method.name}' trains on no private data; "
                          f"DP-SGD has nothing to protect: turn privacy.dp off or choose another method")
    rate = min(1.0, config.train.batch_size / num_examples)
    return calibrate(dp.target_epsilon, dp.delta, rate, steps, dp.accountant,
                     f"client {client} ({num_examples} examples, {steps} DP-SGD steps at sampling rate {rate:.3g})")


def check(config: Config, passes_per_round: list[list[int]], sizes: dict[str, int]) -> dict[str, float]:
    """Every client's noise multiplier, so a delta that is too large or a target that cannot be reached
    is one error before anything runs."""
    return {client: noise_multiplier(config, passes_per_round, client, n) for client, n in sorted(sizes.items())}


@dataclass
class RecordDP:
    """One client's DP-SGD budget in one round. `settings()` gives each training its noise and a fresh
    secret seed; `spend()` records what a training used."""

    dp: DPConfig
    noise: float
    secret: bytes
    round_num: int
    history: History = field(default_factory=list)
    trainings: int = 0

    @classmethod
    def open(cls, config: Config, passes_per_round: list[list[int]], client: str, num_examples: int,
             state: dict[str, Any] | None, folder: Path, round_num: int) -> RecordDP:
        state = state or {}
        noise = state.get("noise_multiplier") or noise_multiplier(config, passes_per_round, client, num_examples)
        history = [tuple(h) for h in state.get("history", [])]
        return cls(dp=config.privacy.dp, noise=float(noise), secret=load_secret(folder), round_num=round_num,
                   history=history)

    def settings(self, purpose: str) -> PrivateSGD:
        self.trainings += 1
        message = f"{self.round_num}:{purpose}:{self.trainings}".encode()
        seed = int.from_bytes(hmac.new(self.secret, message, hashlib.sha256).digest()[:8], "little") >> 2
        return PrivateSGD(noise_multiplier=self.noise, max_grad_norm=self.dp.max_grad_norm, seed=seed)

    def spend(self, sample_rate: float, steps: int) -> None:
        if steps:
            self.history.append((self.noise, sample_rate, steps))

    def epsilon(self) -> float:
        return epsilon(self.history, self.dp.delta, self.dp.accountant)

    def state(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise, "history": [list(h) for h in self.history]}

    def metrics(self) -> dict[str, float]:
        """What the client tells the server: its cumulative epsilon (a function of public settings and n)."""
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.dp.delta, "dp_noise_multiplier": self.noise,
                "dp_steps": float(sum(steps for _, _, steps in self.history))}


def load_secret(folder: Path, name: str = SECRET_FILE) -> bytes:
    """A DP secret kept in `folder` (the client's, or the server's run directory), made on first use:
    32 random bytes, readable by the user only."""
    path = Path(folder) / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one keeps the existing secret
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes()
