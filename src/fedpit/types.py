"""The values that cross a boundary: between data and methods, and between client and server.

`ClientUpload` is the only thing a runtime may send from a client to the server. Everything a
client must keep to itself (private examples, the private adapter, synthetic samples, optimiser
state) lives in `ClientState` or `ClientResult.synthetic`, which runtimes store on the client side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

AdapterState = dict[str, torch.Tensor]
"""LoRA tensors by parameter name (peft naming, adapter name stripped)."""


@dataclass(frozen=True)
class Example:
    """One instruction/response pair. `meta` carries source fields (qtype, source, cluster...)."""

    id: str
    instruction: str
    output: str
    input: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class SyntheticSample:
    """A self-generated sample with its provenance. Never leaves the client."""

    instruction: str
    output: str
    round: int
    client: str
    instruction_demo_ids: list[str]
    response_demo_ids: list[str]
    attempts: int = 1
    max_rouge_vs_private: float = 0.0
    ifs: float | None = None
    selected: bool = False

    def as_example(self, index: int) -> Example:
        sample_id = f"synth-r{self.round}-{self.client}-{index}"
        return Example(id=sample_id, instruction=self.instruction, output=self.output)


@dataclass(frozen=True)
class ClientUpload:
    """What a client sends to the server after a round: shared tensors, a weight, scalar metrics.

    `metrics` holds numbers only (losses, counts, seconds); text never travels. `extras` carries
    shared tensors other than the adapter (e.g. SCAFFOLD's control-variate delta).
    """

    client: str
    tensors: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, AdapterState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"upload metric {key!r} must be a number, got {type(value).__name__}")

    @property
    def num_bytes(self) -> int:
        shared = [*self.tensors.values(), *(t for group in self.extras.values() for t in group.values())]
        return sum(t.numel() * t.element_size() for t in shared)


@dataclass
class ClientState:
    """What a client keeps between rounds on its own side (e.g. a persistent private adapter)."""

    tensors: dict[str, AdapterState] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientResult:
    """A method's full client-side output. Only `upload` goes to the server."""

    upload: ClientUpload
    state: ClientState
    synthetic: list[SyntheticSample] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    audit: dict[str, AdapterState] = field(default_factory=dict)
    """Client-side adapters a local privacy auditor may attack (e.g. W_l); never uploaded."""
    details: dict[str, Any] = field(default_factory=dict)
