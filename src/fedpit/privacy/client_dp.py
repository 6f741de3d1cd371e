"""Client-level differential privacy on the server: DP-FedAvg (McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018) with fixed clipping.

Each client's update W_a,k - W_g is clipped to L2 norm S over all its tensors; the server takes the
uniform mean over the sampled clients and adds N(0, (z*S/m)^2) per coordinate (m = clients sampled).
The mean is uniform because an example-weighted mean gives a large client more than S/m of
influence. The neighbouring relation is one client's whole data in or out, so the guarantee is
about clients, not records. The accountant composes one subsampled Gaussian step per round at
rate m / N. The noise is drawn from a server secret (kept in the run directory), never from the
config, so whoever reads the config cannot subtract it; a round redone after a crash draws the same.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import torch

from fedpit.config import ClientDPConfig
from fedpit.errors import ConfigError
from fedpit.privacy.accounting import calibrate, epsilon, step
from fedpit.types import AdapterState, ClientUpload

STATE_KEY = "client_dp"


def sampling_rate(clients_per_round: int, num_clients: int) -> float:
    sampled = num_clients if clients_per_round <= 0 else min(clients_per_round, num_clients)
    return sampled / num_clients


def noise_multiplier(dp: ClientDPConfig, rate: float, rounds: int, num_clients: int) -> float:
    if dp.delta >= 1.0 / num_clients:
        raise ConfigError(f"privacy.client_dp.delta={dp.delta:g} is not below 1/N for N={num_clients} clients "
                          f"(1/N = {1.0 / num_clients:.4g}); set privacy.client_dp.delta below it")
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    return calibrate(dp.target_epsilon, dp.delta, rate, rounds, dp.accountant,
                     f"client-level DP over {rounds} rounds at sampling rate {rate:.3g}")


def clip_update(upload: AdapterState, global_adapter: AdapterState, bound: float) -> tuple[AdapterState, bool]:
    """upload - global scaled to L2 norm at most `bound` (all tensors together); whether it was cut."""
    delta = {k: upload[k].double() - global_adapter[k].double() for k in global_adapter}
    total = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))
    factor = min(1.0, bound / total) if total > 0 else 1.0
    return {k: d * factor for k, d in delta.items()}, factor < 1.0


@dataclass
class ClientLevelDP:
    """The server's DP-FedAvg mechanism and accountant for one run."""

    dp: ClientDPConfig
    noise: float
    rate: float
    secret: bytes

    def noised_mean(self, global_adapter: AdapterState, uploads: list[ClientUpload], sampled: int,
                    round_num: int) -> tuple[ClientUpload, dict[str, float]]:
        """One upload standing for the mean: W_g + (sum of clipped updates + noise) / m."""
        clipped = [clip_update(u.tensors, global_adapter, self.dp.clip_norm) for u in uploads]
        total = {key: sum(c[key] for c, _ in clipped) for key in global_adapter}
        return self.noised_sum(global_adapter, total, sampled, round_num,
                               sum(cut for _, cut in clipped) / max(len(clipped), 1))

    def noised_sum(self, global_adapter: AdapterState, clipped_sum: AdapterState, sampled: int, round_num: int,
                   clipped_fraction: float) -> tuple[ClientUpload, dict[str, float]]:
        """W_g + (clipped_sum + noise) / m, from the sum of the clipped updates alone: what secure
        aggregation gives the server when each client clipped its own update."""
        seed = int.from_bytes(hmac.new(self.secret, f"round:{round_num}".encode(), hashlib.sha256).digest()[:8],
                              "little") >> 2
        generator = torch.Generator().manual_seed(seed)
        std = self.noise * self.dp.clip_norm
        mean = {}
        for key, tensor in global_adapter.items():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
            mean[key] = (tensor.double() + (clipped_sum[key].double() + noise) / sampled).float()
        figures = {"clipped": clipped_fraction, "noise_multiplier": self.noise, "clip_norm": self.dp.clip_norm}
        return ClientUpload(client="client-dp-mean", tensors=mean, num_examples=1), figures

    def account(self, server_state: dict[str, Any]) -> float:
        """One more round spent; the run's epsilon so far (the history lives in the checkpointed state)."""
        state = server_state.setdefault(STATE_KEY, {"history": []})
        history = step([tuple(h) for h in state["history"]], self.noise, self.rate, self.dp.accountant)
        state["history"] = [list(h) for h in history]
        return epsilon(history, self.dp.delta, self.dp.accountant)
