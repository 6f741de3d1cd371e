"""The server's side of a run, shared by every runtime: sampling, aggregation, records,
checkpoints, evaluation, resume.

A runtime supplies only the transport: given a `RoundPlan` it gets the sampled clients' uploads
back (in process, or over Flower) and hands them to `Server.complete_round`. Everything the
server decides is a function of the config, the seed and the round number, so the same run gives
the same global adapter whatever carries the messages, and a resumed run continues exactly.

Commit point: a round counts as done when its checkpoint manifest is written, which happens last,
after its metrics, leakage and evaluation records. A run killed anywhere before that resumes at
the start of that round, with the metrics of the unfinished round dropped.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from fedpit.config import Config
from fedpit.engines.training import learning_rate_for_round
from fedpit.errors import ClientFailure, ConfigError
from fedpit.evaluation import EvalOptions, evaluate
from fedpit.faults import failpoint
from fedpit.privacy.client_dp import ClientLevelDP, sampling_rate
from fedpit.privacy.client_dp import noise_multiplier as client_noise
from fedpit.privacy.dp import load_secret
from fedpit.progress import RunProgress
from fedpit.runs import RunDir
from fedpit.runtimes.audit import Auditor, record
from fedpit.seeding import derive_seed
from fedpit.types import AdapterState, ClientUpload

log = logging.getLogger(__name__)


def sample_clients(clients: list[str], per_round: int, seed: int, round_num: int) -> list[str]:
    """All clients, or `per_round` of them drawn with a seed that depends only on the round (so
    sampling needs no state to resume and is the same in every runtime)."""
    if per_round <= 0 or per_round >= len(clients):
        return list(clients)
    return sorted(random.Random(derive_seed(seed, "sample", round_num)).sample(clients, per_round))


@dataclass
class RoundPlan:
    """What the server sends out in a round: who, at which learning rate, with which tensors."""

    round_num: int
    sampled: list[str]
    learning_rate: float
    global_adapter: AdapterState
    broadcast: dict[str, AdapterState]
    started: float = field(default_factory=time.perf_counter)


@dataclass
class ClientReport:
    """The server's record of one client's round: its upload and the seconds it spent per phase
    (numbers only; a runtime may carry them in the upload's metrics)."""

    upload: ClientUpload
    phase_seconds: dict[str, float] = field(default_factory=dict)
    wire_bytes: int | None = None
    """Bytes as they travelled, where a transport narrowed them (bf16); else the upload's size."""


@dataclass
class SecureAggregate:
    """What a secure-aggregation transport gives the server instead of the uploads: their weighted mean
    (weights: example counts, or 1 each when the clients clipped their updates for client-level DP),
    the total weight, and what the transport wants on record (error bound, shares, threshold)."""

    mean: AdapterState
    total_weight: float
    contributors: int
    record: dict[str, Any] = field(default_factory=dict)


class Server:
    """One run's server. `start()` restores from the last good checkpoint when the run directory
    has one; `rounds()` then yields the rounds still to run."""

    def __init__(self, config: Config, method, handle, fmt, eval_sets, run: RunDir,
                 progress: RunProgress | None = None, auditor_factory=None, final_sets=None) -> None:
        self.config = config
        self.method = method
        self.handle = handle
        self.fmt = fmt
        self.eval_sets = eval_sets
        self.final_sets = final_sets or {}
        self.run = run
        self.progress = progress or RunProgress(quiet=True)
        self.auditor_factory = auditor_factory
        self.auditor: Auditor | None = None
        self.global_adapter: AdapterState = {}
        self.server_state: dict[str, Any] = {}
        self.first_round = 1
        self.client_dp: ClientLevelDP | None = None

    # ------------------------------------------------------------------ start and resume
    def start(self, client_ids: list[str]) -> int:
        """Load the last committed round, or initialise round 0 (fresh adapter, first evaluation).
        Returns the number of the first round still to run."""
        cfg = self.config
        if cfg.privacy.client_dp.enabled:
            self.client_dp = client_level_dp(cfg, self.method, len(client_ids), self.run)
        initial = self.handle.fresh_adapter(derive_seed(cfg.seed, "lora-init"))
        if self.auditor_factory is not None:
            self.auditor = self.auditor_factory(initial)
        restored = self.run.restore()
        if restored is not None:
            done, self.global_adapter, self.server_state = restored
            self.progress.message(f"resuming after round {done} from {self.run.path}")
            self.first_round = done + 1
            return self.first_round
        self.global_adapter = initial
        self.server_state = {"num_clients": len(client_ids)}
        if cfg.eval.at_start and self.auditor is not None and "global" in cfg.privacy.targets:
            self.audit(self.global_adapter, 0, "global", None)
        if cfg.eval.at_start and cfg.eval.every > 0 and self.eval_sets:
            self.evaluate(self.global_adapter, 0)
        self.run.commit(0, self.global_adapter, self.server_state)
        self.first_round = 1
        return 1

    def rounds(self) -> range:
        self.progress.rounds(self.config.federation.rounds)
        return range(self.first_round, self.config.federation.rounds + 1)

    # ------------------------------------------------------------------ one round
    def plan(self, round_num: int, client_ids: list[str]) -> RoundPlan:
        failpoint("round_start")
        cfg = self.config
        sampled = sample_clients(client_ids, cfg.federation.clients_per_round, cfg.seed, round_num)
        lr = learning_rate_for_round(cfg.train.learning_rate, cfg.train.min_learning_rate, cfg.train.schedule,
                                     round_num, cfg.federation.rounds)
        self.progress.clients(round_num, len(sampled))
        return RoundPlan(round_num=round_num, sampled=sampled, learning_rate=lr,
                         global_adapter=self.global_adapter, broadcast=self.method.broadcast(self.server_state))

    def attack_round(self, round_num: int) -> bool:
        every = self.config.privacy.every
        return self.auditor is not None and every > 0 and (
            round_num % every == 0 or round_num == self.config.federation.rounds)

    def complete_round(self, plan: RoundPlan, reports: list[ClientReport],
                       dropped: dict[str, str] | None = None, secure: SecureAggregate | None = None,
                       wire: dict[str, int] | None = None) -> AdapterState:
        """Aggregate the uploads that arrived, record the round, evaluate, and commit it. With `secure`,
        the reports carry no tensors and the method aggregates the one mean the transport computed.
        `wire`: the transport's bytes of the round in each direction, kept with the round."""
        cfg = self.config
        dropped = dropped or {}
        uploads = [r.upload for r in reports]
        self.check_replies(plan, len(reports), dropped)
        aggregate_start = time.perf_counter()
        client_dp: dict[str, float] = {}
        if secure is not None:
            client_dp = self._aggregate_secure(plan, secure, reports)
        elif uploads and self.client_dp is not None:
            mean, client_dp = self.client_dp.noised_mean(self.global_adapter, uploads, len(plan.sampled),
                                                         plan.round_num)
            client_dp["epsilon"] = self.client_dp.account(self.server_state)
            self.global_adapter = self.method.aggregate(self.global_adapter, [mean], self.server_state)
        elif uploads:
            self.global_adapter = self.method.aggregate(self.global_adapter, uploads, self.server_state)
        per_client = {
            r.upload.client: {**r.upload.metrics, "num_examples": r.upload.num_examples,
                              "upload_bytes": r.wire_bytes or r.upload.num_bytes,
                              "seconds": {k: round(v, 3) for k, v in r.phase_seconds.items()}}
            for r in reports
        }
        round_record = {
            "kind": "round", "method": cfg.method.name, "round": plan.round_num, "sampled": plan.sampled,
            "learning_rate": plan.learning_rate, "clients": per_client,
            "upload_bytes": sum(r.wire_bytes or r.upload.num_bytes for r in reports),
            "seconds": {"aggregate": round(time.perf_counter() - aggregate_start, 3),
                        "round": round(time.perf_counter() - plan.started, 3)},
        }
        if dropped:
            round_record["dropped"] = dropped
        if client_dp:
            round_record["client_dp"] = client_dp
        if wire:
            round_record["wire"] = wire
        if secure is not None:
            round_record["secure_aggregation"] = {"contributors": secure.contributors, **secure.record}
        self.run.append_metrics(round_record)
        losses = [c["train_loss_private"] for c in per_client.values() if c.get("train_loss_private") is not None]
        loss_note = f", mean private loss {sum(losses) / len(losses):.3f}" if losses else ""
        dropped_note = f", {len(dropped)} dropped" if dropped else ""
        self.progress.round_done(plan.round_num, f"{len(reports)} clients{dropped_note}{loss_note}, "
                                                 f"{round_record['seconds']['round']:.0f}s")
        last = plan.round_num == cfg.federation.rounds
        if self.attack_round(plan.round_num) and "global" in cfg.privacy.targets:
            self.audit(self.global_adapter, plan.round_num, "global", None)
        if cfg.eval.every > 0 and self.eval_sets and (plan.round_num % cfg.eval.every == 0 or last):
            self.evaluate(self.global_adapter, plan.round_num)
        failpoint("before_commit")
        every = cfg.output.checkpoint_every
        if last or (every and plan.round_num % every == 0):
            self.run.commit(plan.round_num, self.global_adapter, self.server_state)
        return self.global_adapter

    def _aggregate_secure(self, plan: RoundPlan, secure: SecureAggregate,
                          reports: list[ClientReport]) -> dict[str, float]:
        """The method's server rule on the secure mean. Under client-level DP every client clipped its own
        update and weighed 1, so the mean times the contributors is the sum of clipped updates; the
        server adds the noise to that sum as it would to the sum of the uploads it clipped itself."""
        if self.client_dp is None:
            mean = ClientUpload(client="secure-aggregate", tensors=secure.mean,
                                num_examples=round(secure.total_weight))
            self.global_adapter = self.method.aggregate(self.global_adapter, [mean], self.server_state)
            return {}
        clipped_sum = {k: (secure.mean[k].double() - self.global_adapter[k].double()) * secure.contributors
                       for k in self.global_adapter}
        cut = [r.upload.metrics.get("client_dp_clipped", 0.0) for r in reports]
        mean, figures = self.client_dp.noised_sum(self.global_adapter, clipped_sum, len(plan.sampled),
                                                  plan.round_num, sum(cut) / max(len(cut), 1))
        figures["epsilon"] = self.client_dp.account(self.server_state)
        self.global_adapter = self.method.aggregate(self.global_adapter, [mean], self.server_state)
        return figures

    def required_replies(self, plan: RoundPlan) -> int:
        """federation.min_replies, or every sampled client when it is 0."""
        wanted = self.config.federation.min_replies
        return len(plan.sampled) if wanted <= 0 else min(wanted, len(plan.sampled))

    def check_replies(self, plan: RoundPlan, received: int, dropped: dict[str, str]) -> None:
        if received >= self.required_replies(plan):
            return
        reasons = "; ".join(f"{client}: {why}" for client, why in dropped.items()) or "no reason given"
        raise ClientFailure(
            f"round {plan.round_num}: {received} of {len(plan.sampled)} sampled clients replied, fewer than the "
            f"{self.required_replies(plan)} required (federation.min_replies) ({reasons}); rounds before "
            f"{plan.round_num} are saved: fix the cause and continue with `fedpit run --resume {self.run.path}`")

    def finish(self) -> AdapterState:
        """Evaluate the final global model on the whole held-out sets and save it in PEFT format.
        Runs after the last commit: a run killed here resumes with nothing to train and redoes this."""
        if self.final_sets:
            self.evaluate(self.global_adapter, self.config.federation.rounds, final=True)
        self.handle.save_adapter(self.global_adapter, self.run.path / "adapter")
        return self.global_adapter

    # ------------------------------------------------------------------ measurements
    def evaluate(self, adapter: AdapterState, round_num: int, final: bool = False, client: str | None = None) -> dict:
        """Evaluate `adapter` on the per-round subsets, or (`final`) on the whole held-out sets; keep
        every answer under eval/ and the summary in metrics.jsonl. `client` marks a personal model."""
        cfg = self.config
        start = time.perf_counter()
        sets = self.final_sets if final else self.eval_sets
        stage = "final" if final else f"round-{round_num:03d}"
        options = EvalOptions(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                              max_length=cfg.model.max_length)
        label = "final eval" if final else "eval"
        results = evaluate(self.handle, self.fmt, adapter, sets, options, self.progress.phase, label=label)
        for name, result in results.items():
            self.run.save_answers(stage, name, result.records, client)
        entry = {"kind": "eval", "stage": "final" if final else "round", "method": cfg.method.name,
                 "round": round_num, "target": "personal" if client else "global",
                 "results": {name: result.metrics for name, result in results.items()},
                 "seconds": round(time.perf_counter() - start, 3)}
        if client:
            entry["client"] = client
        self.run.append_metrics(entry)
        summary = ", ".join(f"{name} rougeL {r.metrics['rougeL']:.3f} nll {r.metrics['nll']:.3f}"
                            for name, r in results.items())
        whose = f"personal model of {client}" if client else "global model"
        self.progress.message(f"{label} of the {whose} after round {round_num}: {summary}")
        return entry

    def audit(self, adapter: AdapterState, round_num: int, target: str, client: str | None) -> None:
        assert self.auditor is not None
        self.progress.phase(f"attack {target} {client or ''}".strip(), 0, 1)
        figures = self.auditor.attack(adapter, client)
        self.run.append_metrics(record(round_num, target, figures, client, self.config.method.name))
        shown = {k: round(v, 3) for k, v in figures.items()
                 if k in ("memorization_rougeL", "mia_ref_auc", "canary_exposure_extrapolated")}
        self.progress.message(f"leakage round {round_num} {target} {client or ''}: {shown}")


def client_level_dp(config: Config, method, num_clients: int, run: RunDir | None = None) -> ClientLevelDP:
    """The run's DP-FedAvg mechanism; a ConfigError for a method whose server rule needs more than the
    mean of the uploads, or settings that cannot hold. The noise secret lives in the run directory."""
    if not method.mean_aggregation:
        raise ConfigError(f"privacy.client_dp cannot wrap method '{config.method.name}': its server rule needs more "
                          f"than the mean of the uploads (individual uploads, control variates, or none at all); "
                          f"use a method such as fedavg, fedprox, fedpit, fedmit or the FedOPT family")
    dp = config.privacy.client_dp
    rate = sampling_rate(config.federation.clients_per_round, num_clients)
    noise = client_noise(dp, rate, config.federation.rounds, num_clients)
    secret = load_secret(run.path, "server-dp-secret") if run is not None else b""
    return ClientLevelDP(dp=dp, noise=noise, rate=rate, secret=secret)
