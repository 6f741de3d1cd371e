"""The privacy auditor: which examples are attacked, against which adapter, and how results are
recorded. Attacked member and non-member sets are fixed by the seed, so figures are comparable
across rounds, methods and beta values.

Targets: the global model (the paper's threat), each client's upload base + W_a,k (the
honest-but-curious server's view) and, for reference, the private adapter base + W_l,k (what
would leak without FedPIT's mixing).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from fedpit.config import Config, PrivacyConfig
from fedpit.data.federation import Federation
from fedpit.engines.scoring import reference_nll
from fedpit.model import ModelHandle
from fedpit.privacy import Canary, exposure, extraction_attack, make_canaries, membership_attack, plant_canaries
from fedpit.prompts import PromptFormat
from fedpit.seeding import derive_seed
from fedpit.types import AdapterState, Example


def plant(config: Config, federation: Federation) -> list[Canary]:
    """Insert the configured canaries into the first clients' private data (in place)."""
    privacy = config.privacy
    if not privacy.enabled or privacy.canary_clients <= 0:
        return []
    chosen = sorted(federation.clients)[: privacy.canary_clients]
    canaries = make_canaries(chosen, privacy.canaries_per_client, privacy.canary_digits,
                             derive_seed(config.seed, "canaries"))
    federation.clients = plant_canaries(federation.clients, canaries, privacy.canary_repeats)
    return canaries


@dataclass
class Auditor:
    config: PrivacyConfig
    handle: ModelHandle
    fmt: PromptFormat
    max_length: int
    batch_size: int
    members: dict[str, list[Example]]
    nonmembers: list[Example]
    canaries: list[Canary]
    seed: int
    reference: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config, federation: Federation, handle: ModelHandle, fmt: PromptFormat,
              canaries: list[Canary], base_adapter: AdapterState) -> Auditor:
        privacy = config.privacy
        members: dict[str, list[Example]] = {}
        for client, examples in sorted(federation.clients.items()):
            real = [e for e in examples if not e.meta.get("canary")]
            rng = random.Random(derive_seed(config.seed, "attack-members", client))
            members[client] = sorted(rng.sample(real, min(privacy.num_members, len(real))), key=lambda e: e.id)
        everyone = sorted((e for group in members.values() for e in group), key=lambda e: e.id)
        rng = random.Random(derive_seed(config.seed, "attack-members", "global"))
        members["*"] = sorted(rng.sample(everyone, min(privacy.num_members, len(everyone))), key=lambda e: e.id)
        auditor = cls(config=privacy, handle=handle, fmt=fmt, max_length=config.model.max_length,
                      batch_size=config.eval.batch_size, members=members,
                      nonmembers=federation.holdout[: privacy.num_nonmembers], canaries=canaries, seed=config.seed)
        if "membership" in privacy.attacks:
            # The untuned base model's losses calibrate the membership attack.
            handle.set_adapter(base_adapter)
            unique = {e.id: e for e in [*everyone, *auditor.nonmembers]}
            losses = reference_nll(handle, fmt, list(unique.values()), auditor.max_length, auditor.batch_size)
            auditor.reference = dict(zip(unique, losses))
        return auditor

    def attack(self, adapter: AdapterState, client: str | None = None) -> dict[str, float]:
        """All configured attacks against base + `adapter`; `client` narrows members and canaries."""
        start = time.perf_counter()
        self.handle.set_adapter(adapter)
        members = self.members["*" if client is None else client]
        figures: dict[str, float] = {}
        if "memorization" in self.config.attacks:
            figures |= extraction_attack(self.handle, self.fmt, members, self.config.prefix_tokens,
                                         self.config.max_new_tokens, self.batch_size)
        if "membership" in self.config.attacks and self.nonmembers:
            nonmembers = self.nonmembers
            member_losses = reference_nll(self.handle, self.fmt, members, self.max_length, self.batch_size)
            other_losses = reference_nll(self.handle, self.fmt, nonmembers, self.max_length, self.batch_size)
            figures |= membership_attack(member_losses, other_losses,
                                         [self.reference[e.id] for e in members],
                                         [self.reference[e.id] for e in nonmembers])
        if "canary" in self.config.attacks:
            relevant = [c for c in self.canaries if client is None or c.client == client]
            results = [exposure(self.handle, self.fmt, c, self.config.canary_candidates,
                                derive_seed(self.seed, "canary-candidates", c.name)) for c in relevant]
            if results:
                for key in ("exposure_sampled", "exposure_extrapolated"):
                    figures[f"canary_{key}"] = sum(r[key] for r in results) / len(results)
        figures["attack_seconds"] = time.perf_counter() - start
        return figures


def record(round_num: int, target: str, figures: dict[str, float], client: str | None = None,
           method: str = "") -> dict[str, Any]:
    return {"kind": "privacy", "method": method, "round": round_num, "target": target, "client": client,
            "figures": figures}
