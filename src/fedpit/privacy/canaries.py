"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a record with a random secret (a patient number of `digits` digits) planted, repeated
r times, in a client's private data. After training, exposure = log2(|space|) - log2(rank of the
true secret among all candidates by the model's loss). The rank is estimated from a random sample
of candidates, and -- because a sample cannot resolve ranks beyond its own size -- also by the
paper's extrapolation: fit a skew-normal to the candidates' losses and read the share of the
space below the true secret's loss from its CDF.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedpit.engines.encoding import encode_pair
from fedpit.engines.scoring import target_losses
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.types import Example

FIRST_NAMES = ["Alex", "Maria", "Jon", "Priya", "Chen", "Fatima", "Lukas", "Amara", "Diego", "Yuki"]
LAST_NAMES = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Silva", "Kowalski", "Reyes", "Ahmed"]


@dataclass(frozen=True)
class Canary:
    client: str
    name: str
    secret: str
    digits: int

    @property
    def instruction(self) -> str:
        return f"What is the patient number of {self.name}?"

    @property
    def answer_prefix(self) -> str:
        return f"The patient number of {self.name} is "

    def example(self, copy: int) -> Example:
        return Example(id=f"canary-{self.client}-{self.name.replace(' ', '_')}-{copy}",
                       instruction=self.instruction, output=f"{self.answer_prefix}{self.secret}.",
                       meta={"canary": True})


def make_canaries(clients: list[str], per_client: int, digits: int, seed: int) -> list[Canary]:
    rng = random.Random(seed)
    canaries = []
    for client in clients:
        for _ in range(per_client):
            name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}-{rng.randrange(100, 999)}"
            secret = str(rng.randrange(10 ** (digits - 1), 10**digits))
            canaries.append(Canary(client=client, name=name, secret=secret, digits=digits))
    return canaries


def plant_canaries(clients: dict[str, list[Example]], canaries: list[Canary], repeats: int) -> dict[str, list[Example]]:
    """Return new client data with each canary inserted `repeats` times (never in evaluation sets)."""
    planted = {c: list(examples) for c, examples in clients.items()}
    for canary in canaries:
        planted[canary.client].extend(canary.example(i) for i in range(repeats))
    return planted


def _secret_losses(handle: ModelHandle, fmt: PromptFormat, canary: Canary, secrets: list[str],
                   batch_size: int) -> list[float]:
    context = fmt.render(canary.instruction) + canary.answer_prefix
    pairs = [encode_pair(handle.tokenizer, context, f"{secret}.", 512) for secret in secrets]
    return target_losses(handle, pairs, batch_size)


def exposure(
    handle: ModelHandle,
    fmt: PromptFormat,
    canary: Canary,
    num_candidates: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exposure of one canary under the adapter currently loaded."""
    rng = random.Random(seed)
    low, high = 10 ** (canary.digits - 1), 10**canary.digits
    space = high - low
    candidates: set[str] = set()
    while len(candidates) < min(num_candidates, space - 1):
        value = str(rng.randrange(low, high))
        if value != canary.secret:
            candidates.add(value)
    ordered = sorted(candidates)
    losses = _secret_losses(handle, fmt, canary, [canary.secret, *ordered], batch_size)
    true_loss, others = losses[0], np.array(losses[1:])
    below = int((others < true_loss).sum())
    sampled_rank = 1 + space * below / len(others)
    params = stats.skewnorm.fit(others)
    tail = float(stats.skewnorm.cdf(true_loss, *params))
    extrapolated_rank = max(1.0, 1 + space * tail)
    return {
        "exposure_sampled": math.log2(space) - math.log2(sampled_rank),
        "exposure_extrapolated": math.log2(space) - math.log2(extrapolated_rank),
        "secret_loss": true_loss,
        "candidate_loss_mean": float(others.mean()),
    }
