"""What a federated method is: a client rule and a server rule, plus the context they run in.

A method never touches transport, files or other clients. The client rule receives a
`ClientContext` (private examples, private state, the engines bound to the shared model) and
returns a `ClientResult`; the server rule turns uploads into the next global adapter.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from fedpit.config import Config, build_dataclass
from fedpit.engines import scoring
from fedpit.engines.training import PrivateSGD, TrainOptions, TrainResult, train_adapter
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.registry import Registry
from fedpit.seeding import derive_seed
from fedpit.synth import SynthOutcome, self_generate
from fedpit.types import AdapterState, ClientResult, ClientState, ClientUpload, Example

ProgressCallback = Callable[[str, int, int], None]


class PrivateBudget(Protocol):
    """What a runtime gives a client round for record-level DP (`privacy.dp.RecordDP`): DP-SGD settings
    for each training on private examples, and the record of what each spent. Methods never see it:
    `ClientContext.train` applies it to every training whose examples include private ones."""

    def settings(self, purpose: str) -> PrivateSGD: ...

    def spend(self, sample_rate: float, steps: int) -> None: ...


@dataclass
class ClientContext:
    """Everything one client's rule may use in one round. Built fresh by the runtime each round."""

    client: str
    round: int
    examples: list[Example]
    state: ClientState
    handle: ModelHandle
    fmt: PromptFormat
    config: Config
    learning_rate: float
    seed: int
    broadcast: dict[str, AdapterState] = field(default_factory=dict)
    """What the server sent besides the global adapter this round (from `Method.broadcast`)."""
    on_progress: ProgressCallback | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    dp: PrivateBudget | None = None
    """Record-level DP-SGD for every training on private examples (None: plain training)."""
    public: list[Example] = field(default_factory=list)
    """Public demonstrations for self-generation, used when `synth.demonstrations = "public"`."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def _progress(self, label: str) -> Callable[[int, int], None] | None:
        if self.on_progress is None:
            return None
        callback = self.on_progress
        return lambda done, total: callback(label, done, total)

    def train(self, start: AdapterState, examples: list[Example], purpose: str, epochs: int | None = None,
              extra_loss=None, record_gradient: bool = False) -> tuple[AdapterState, TrainResult]:
        """Train a copy of `start` on `examples`; `purpose` names the phase and seeds the shuffle. Under
        record-level DP, a training that includes any private example is DP-SGD, whatever its purpose."""
        train = self.config.train
        options = TrainOptions(
            batch_size=train.batch_size, learning_rate=self.learning_rate, epochs=epochs or train.epochs,
            weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
            max_length=self.config.model.max_length, max_steps=train.max_steps,
        )
        private_ids = {e.id for e in self.examples}
        private = self.dp.settings(purpose) if self.dp is not None and any(e.id in private_ids for e in examples) \
            else None
        with self.phase(f"train_{purpose}"):
            self.handle.set_adapter(start)
            step = self._progress(f"train {purpose}")
            result = train_adapter(
                self.handle, self.fmt, examples, options, seed=derive_seed(self.seed, purpose),
                extra_loss=extra_loss, on_step=(lambda s, t, _loss: step(s, t)) if step else None,
                private=private, record_gradient=record_gradient,
            )
            if private is not None:
                self.dp.spend(result.sample_rate, result.steps)
            return self.handle.get_adapter(), result

    def self_generate(self, adapter: AdapterState) -> SynthOutcome:
        with self.phase("generation"):
            self.handle.set_adapter(adapter)
            return self_generate(
                self.handle, self.fmt, self.examples, self.config.synth, seed=derive_seed(self.seed, "synth"),
                round_num=self.round, client=self.client, on_progress=self._progress("self-generation"),
                public=self.public if self.config.synth.demonstrations == "public" else None,
            )

    def ifs(self, adapter: AdapterState, examples: list[Example]) -> list[float]:
        with self.phase("ifs_scoring"):
            self.handle.set_adapter(adapter)
            return scoring.ifs_scores(self.handle, self.fmt, examples, self.config.model.max_length,
                                      self.config.eval.batch_size)

    def upload(self, tensors: AdapterState, **metrics: float) -> ClientUpload:
        return ClientUpload(client=self.client, tensors=tensors, num_examples=len(self.examples),
                            metrics={k: float(v) for k, v in metrics.items()})


def train_private(ctx: ClientContext, global_adapter: AdapterState, extra_loss=None) -> ClientResult:
    """The FedAvg client rule (train from the global adapter on private data, upload the result),
    shared by FedAvg, FedProx and the FedOPT family, which differ only on the server or in a loss term."""
    local, result = ctx.train(global_adapter, ctx.examples, "private", extra_loss=extra_loss)
    upload = ctx.upload(local, train_loss_private=result.mean_loss)
    return ClientResult(upload=upload, state=ctx.state, phase_seconds=ctx.phase_seconds)


class Method(ABC):
    """A registered federated method. Subclasses set `name` and `Options` and register themselves."""

    name: ClassVar[str]
    Options: ClassVar[type]
    uses_synthetic: ClassVar[bool] = False
    pools_clients: ClassVar[bool] = False
    """True for Centralized: the runtime gives the method one client holding every example."""
    mean_aggregation: ClassVar[bool] = False
    """True when `aggregate` depends on the uploads only through their example-weighted mean. Client-level
    DP needs it: it hands the method a single upload holding the clipped, noised mean."""

    def __init__(self, options: Any, config: Config) -> None:
        self.options = options
        self.config = config

    def private_passes(self, round_num: int) -> list[int]:
        """Epochs of each training on private examples in one client round (DP calibrates its noise to
        the run's total); override when the client rule trains on private data more than once."""
        return [self.config.train.epochs]

    def broadcast(self, server_state: dict[str, Any]) -> dict[str, AdapterState]:
        """Tensors the server sends to every sampled client besides the global adapter (default none)."""
        return {}

    @abstractmethod
    def client_update(self, ctx: ClientContext, global_adapter: AdapterState) -> ClientResult: ...

    @abstractmethod
    def aggregate(self, global_adapter: AdapterState, uploads: list[ClientUpload],
                  server_state: dict[str, Any]) -> AdapterState: ...


METHODS: Registry[type[Method]] = Registry("method")


def build_method(config: Config) -> Method:
    """Look up `method.name` and check its options (`method.*` and `[method.<name>]`) against that
    method's Options. Tables for other methods are checked to name registered methods."""
    for table in config.method.tables:
        METHODS.get(table)
    cls = METHODS.get(config.method.name)
    options = build_dataclass(cls.Options, config.method.options_for(config.method.name), "method")
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return cls(options, config)
