"""In-process simulator: clients run one after another in one process sharing one base model.

This runtime only moves things: it gives each sampled client its context, keeps what the client
keeps (state, synthetic samples) on the client's side of the run directory, and hands the server
rule nothing but the `ClientUpload`s. The research default, as in the paper's experiments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from fedpit.config import Config
from fedpit.data.federation import Federation, build_federation, check_demonstrations
from fedpit.errors import ConfigError, FedpitError
from fedpit.methods import Method, build_method
from fedpit.model import ModelHandle, load_model
from fedpit.privacy import dp as record_dp
from fedpit.progress import RunProgress
from fedpit.prompts import PromptFormat, make_format
from fedpit.runs import RunDir
from fedpit.runtimes.audit import Auditor, plant
from fedpit.runtimes.client import ClientRunner
from fedpit.runtimes.server import ClientReport, Server, client_level_dp, sample_clients
from fedpit.runtimes.state import ClientStateStore
from fedpit.types import AdapterState, ClientUpload

__all__ = ["Experiment", "build_clients", "open_run", "prepare", "run_experiment", "sample_clients"]

log = logging.getLogger(__name__)
UploadObserver = Callable[[int, ClientUpload], None]


@dataclass
class Experiment:
    """Everything validated and loaded before a run directory is created, so bad input never
    leaves a half-written run behind."""

    config: Config
    method: Method
    handle: ModelHandle
    fmt: PromptFormat
    federation: Federation
    canaries: list = field(default_factory=list)

    def identity(self) -> dict[str, str]:
        """What a run directory must match to be resumed by this code on this data."""
        return {"fedpit": version("fedpit"), "data": self.federation.fingerprint()}


def prepare(config: Config, handle: ModelHandle | None = None) -> Experiment:
    method = build_method(config)
    if handle is None or not handle.compatible(config.model, config.lora):
        handle = load_model(config.model, config.lora, seed=config.seed)
    fmt = make_format(config.prompt.template, handle.tokenizer)
    federation, canaries = build_clients(config, method, handle.tokenizer)
    return Experiment(config=config, method=method, handle=handle, fmt=fmt, federation=federation, canaries=canaries)


def build_clients(config: Config, method: Method, tokenizer) -> tuple[Federation, list]:
    """The federation as the method's clients see it (canaries planted, pooled for centralized), with
    every check that needs the clients' data: demonstrations, and both kinds of DP, whose settings hold
    or fail by each client's size. Needs only the tokenizer, so a batch can check every job first."""
    federation = build_federation(config, tokenizer)
    canaries = plant(config, federation)
    if method.pools_clients:
        federation.clients = {"pooled": [e for c in sorted(federation.clients) for e in federation.clients[c]]}
    if method.uses_synthetic:
        check_demonstrations(federation, config)
    if config.privacy.client_dp.enabled:
        client_level_dp(config, method, len(federation.clients))  # refuses what it cannot wrap, before anything runs
    if config.privacy.dp.enabled:
        passes = [method.private_passes(r) for r in range(1, config.federation.rounds + 1)]
        record_dp.check(config, passes, {c: len(e) for c, e in federation.clients.items()})
    return federation, canaries


def open_run(exp: Experiment, path: Path, resume: bool = False) -> RunDir:
    """A new run directory, or (`resume`) an existing one after checking it was made by this code
    from this data, so a resumed run cannot silently mix two experiments."""
    if not resume:
        run = RunDir.create(path, exp.config)
        run.write_status("running", federation=exp.federation.summary(), identity=exp.identity())
        return run
    run = RunDir(path)
    stored = run.read_status().get("identity", {})
    current = exp.identity()
    for key, what in (("fedpit", "fedpit version"), ("data", "data (clients, evaluation sets)")):
        if stored.get(key) != current[key]:
            raise FedpitError(
                f"cannot resume '{path}': its {what} differs from now ({stored.get(key, 'unknown')!s:.16} vs "
                f"{current[key]:.16}); start a new run, or restore the code and data it was made with")
    run.write_status("running")
    return run


def run_experiment(
    exp: Experiment, run: RunDir, progress: RunProgress | None = None, observer: UploadObserver | None = None
) -> AdapterState:
    """Run every round still to run (all of them, or those after the last checkpoint when `run`
    holds one); returns the final global adapter (also saved in PEFT format)."""
    cfg = exp.config
    if cfg.flower.secure_aggregation:
        raise ConfigError("flower.secure_aggregation secures what travels between clients and server, and the "
                          "in-process simulator sends nothing: run with --runtime flower-sim or on a Flower "
                          "deployment (`fedpit flower submit`), or set flower.secure_aggregation=false")
    progress = progress or RunProgress(quiet=True)
    client_ids = sorted(exp.federation.clients)
    auditor_factory = None
    if cfg.privacy.enabled:
        def auditor_factory(base: AdapterState) -> Auditor:
            return Auditor.build(cfg, exp.federation, exp.handle, exp.fmt, exp.canaries, base)
    server = Server(cfg, exp.method, exp.handle, exp.fmt, exp.federation.eval_sets, run, progress, auditor_factory,
                    final_sets=exp.federation.final_sets)
    server.start(client_ids)
    clients = ClientRunner(cfg, exp.method, exp.handle, exp.fmt, run.path / "clients", exp.federation.public)
    for round_num in server.rounds():
        plan = server.plan(round_num, client_ids)
        reports, dropped = [], {}
        for done, client in enumerate(plan.sampled, start=1):
            try:
                result = clients.run_round(client, exp.federation.clients[client], round_num, plan.global_adapter,
                                           plan.learning_rate, plan.broadcast, progress.phase)
            except Exception as exc:  # one client's failure (incl. torch.OutOfMemoryError) is that client's
                dropped[client] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                log.exception("client %s failed in round %d", client, round_num)
                progress.message(f"client {client} failed in round {round_num}: {dropped[client]}")
                if len(plan.sampled) - len(dropped) < server.required_replies(plan):
                    server.check_replies(plan, len(reports), dropped)  # stop now: too few can still reply
                continue
            upload = result.upload  # the only thing that crosses to the server
            if observer is not None:
                observer(round_num, upload)
            _keep_for_audit(server, run, round_num, client, result)
            reports.append(ClientReport(upload=upload, phase_seconds=result.phase_seconds))
            progress.client_done(done)
        server.complete_round(plan, reports, dropped)
    final = server.finish()
    _evaluate_personal(server, clients.store, client_ids)
    return final


def _keep_for_audit(server: Server, run: RunDir, round_num: int, client: str, result) -> None:
    """The privacy audit of a simulation: keep the server's view (uploads) and, for reference, the
    private adapter, and attack them now when this is an attack round."""
    privacy = server.config.privacy
    if not privacy.enabled:
        return
    upload = result.upload
    if privacy.save_uploads:
        run.save_upload(round_num, client, upload.tensors)
    if "private" in privacy.targets and "private" in result.audit:
        run.save_client_audit(client, round_num, "private", result.audit["private"])
    if server.attack_round(round_num):
        if "uploads" in privacy.targets and upload.tensors:
            server.audit(upload.tensors, round_num, "upload", client)
        if "private" in privacy.targets and "private" in result.audit:
            server.audit(result.audit["private"], round_num, "private", client)


def _evaluate_personal(server: Server, store: ClientStateStore, clients: list[str]) -> None:
    """Clients that keep a private adapter (LocIT, LocIT+SG, FedPIT's persistent option) also get their
    personalised model (base + W_l) evaluated after the last round, on the whole held-out sets when
    final evaluation is on (else on the per-round subsets); the figures are the client's own to report."""
    rounds = server.config.federation.rounds
    final = bool(server.final_sets)
    if not final and not (server.config.eval.every > 0 and server.eval_sets):
        return
    for client in clients:
        private = store.load(client, rounds + 1).tensors.get("private")
        if private is not None:
            server.evaluate(private, rounds, final=final, client=client)
