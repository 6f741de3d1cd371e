"""In-process simulator: clients run one after another in one process sharing one base model.

This runtime only moves things: it gives each sampled client its context, keeps what the client
keeps (state, synthetic samples) on the client's side of the run directory, and hands the server
rule nothing but the `ClientUpload`s. The research default, as in the paper's experiments.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedpit.config import Config
from fedpit.data.federation import Federation, build_federation, check_demonstrations
from fedpit.engines.training import learning_rate_for_round
from fedpit.evaluation import EvalOptions, evaluate
from fedpit.methods import ClientContext, Method, build_method
from fedpit.model import ModelHandle, load_model
from fedpit.progress import RunProgress
from fedpit.prompts import PromptFormat, make_format
from fedpit.runs import RunDir
from fedpit.runtimes.audit import Auditor, plant, record
from fedpit.runtimes.state import ClientStateStore
from fedpit.seeding import derive_seed
from fedpit.types import AdapterState, ClientUpload

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
    server_state: dict[str, Any] = field(default_factory=dict)


def prepare(config: Config, handle: ModelHandle | None = None) -> Experiment:
    method = build_method(config)
    if handle is None or not handle.compatible(config.model, config.lora):
        handle = load_model(config.model, config.lora, seed=config.seed)
    fmt = make_format(config.prompt.template, handle.tokenizer)
    federation = build_federation(config, handle.tokenizer)
    canaries = plant(config, federation)
    if method.pools_clients:
        federation.clients = {"pooled": [e for c in sorted(federation.clients) for e in federation.clients[c]]}
    if method.uses_synthetic:
        check_demonstrations(federation, config)
    return Experiment(config=config, method=method, handle=handle, fmt=fmt, federation=federation, canaries=canaries)


def sample_clients(clients: list[str], per_round: int, seed: int, round_num: int) -> list[str]:
    """All clients, or `per_round` of them drawn with a seed that depends only on the round."""
    if per_round <= 0 or per_round >= len(clients):
        return list(clients)
    return sorted(random.Random(derive_seed(seed, "sample", round_num)).sample(clients, per_round))


def _evaluate(exp: Experiment, run: RunDir, adapter: AdapterState, round_num: int, progress: RunProgress) -> dict:
    cfg = exp.config
    start = time.perf_counter()
    options = EvalOptions(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                          max_length=cfg.model.max_length)
    results = evaluate(exp.handle, exp.fmt, adapter, exp.federation.eval_sets, options, progress.phase)
    record = {"kind": "eval", "method": cfg.method.name, "round": round_num, "target": "global",
              "results": results, "seconds": round(time.perf_counter() - start, 3)}
    run.append_metrics(record)
    summary = ", ".join(f"{name} rougeL {m['rougeL']:.3f} nll {m['nll']:.3f}" for name, m in results.items())
    progress.message(f"eval after round {round_num}: {summary}")
    return record


def _is_attack_round(cfg: Config, round_num: int) -> bool:
    every = cfg.privacy.every
    return every > 0 and (round_num % every == 0 or round_num == cfg.federation.rounds)


def _audit(exp: Experiment, run: RunDir, auditor: Auditor, adapter: AdapterState, round_num: int, target: str,
           client: str | None, progress: RunProgress) -> None:
    progress.phase(f"attack {target} {client or ''}".strip(), 0, 1)
    figures = auditor.attack(adapter, client)
    run.append_metrics(record(round_num, target, figures, client, exp.config.method.name))
    shown = {k: round(v, 3) for k, v in figures.items() if k in ("memorization_rougeL", "mia_ref_auc",
                                                                 "canary_exposure_extrapolated")}
    progress.message(f"leakage round {round_num} {target} {client or ''}: {shown}")


def run_experiment(
    exp: Experiment, run: RunDir, progress: RunProgress | None = None, observer: UploadObserver | None = None
) -> AdapterState:
    """Run every round; returns the final global adapter (also saved in PEFT format)."""
    cfg = exp.config
    progress = progress or RunProgress(quiet=True)
    store = ClientStateStore(run.path / "clients")
    global_adapter = exp.handle.fresh_adapter(derive_seed(cfg.seed, "lora-init"))
    client_ids = sorted(exp.federation.clients)
    exp.server_state.setdefault("num_clients", len(client_ids))
    progress.rounds(cfg.federation.rounds)
    auditor = None
    if cfg.privacy.enabled:
        auditor = Auditor.build(cfg, exp.federation, exp.handle, exp.fmt, exp.canaries, global_adapter)
        if cfg.eval.at_start and "global" in cfg.privacy.targets:
            _audit(exp, run, auditor, global_adapter, 0, "global", None, progress)
    if cfg.eval.at_start and cfg.eval.every > 0 and exp.federation.eval_sets:
        _evaluate(exp, run, global_adapter, 0, progress)
    for round_num in range(1, cfg.federation.rounds + 1):
        round_start = time.perf_counter()
        sampled = sample_clients(client_ids, cfg.federation.clients_per_round, cfg.seed, round_num)
        lr = learning_rate_for_round(cfg.train.learning_rate, cfg.train.min_learning_rate, cfg.train.schedule,
                                     round_num, cfg.federation.rounds)
        progress.clients(round_num, len(sampled))
        broadcast = exp.method.broadcast(exp.server_state)
        uploads: list[ClientUpload] = []
        per_client: dict[str, dict[str, Any]] = {}
        attack_now = auditor is not None and _is_attack_round(cfg, round_num)
        for done, client in enumerate(sampled, start=1):
            ctx = ClientContext(
                client=client, round=round_num, examples=exp.federation.clients[client],
                state=store.load(client), handle=exp.handle, fmt=exp.fmt, config=cfg, learning_rate=lr,
                seed=derive_seed(cfg.seed, "client", client, round_num), broadcast=broadcast,
                on_progress=progress.phase,
            )
            result = exp.method.client_update(ctx, global_adapter)
            store.save(client, result.state)  # client side: never leaves the client
            if cfg.output.save_synthetic and result.synthetic:
                run.save_synthetic(client, round_num, result.synthetic)
            upload = result.upload  # the only thing that crosses to the server
            if observer is not None:
                observer(round_num, upload)
            uploads.append(upload)
            if cfg.privacy.enabled and cfg.privacy.save_uploads:
                run.save_upload(round_num, client, upload.tensors)
            if "private" in cfg.privacy.targets and "private" in result.audit and cfg.privacy.enabled:
                run.save_client_audit(client, round_num, "private", result.audit["private"])
            if attack_now:
                if "uploads" in cfg.privacy.targets and upload.tensors:
                    _audit(exp, run, auditor, upload.tensors, round_num, "upload", client, progress)
                if "private" in cfg.privacy.targets and "private" in result.audit:
                    _audit(exp, run, auditor, result.audit["private"], round_num, "private", client, progress)
            per_client[client] = {
                **upload.metrics, "num_examples": upload.num_examples, "upload_bytes": upload.num_bytes,
                "seconds": {k: round(v, 3) for k, v in result.phase_seconds.items()},
            }
            progress.client_done(done)
        aggregate_start = time.perf_counter()
        global_adapter = exp.method.aggregate(global_adapter, uploads, exp.server_state)
        record = {
            "kind": "round", "method": cfg.method.name, "round": round_num, "sampled": sampled,
            "learning_rate": lr, "clients": per_client,
            "upload_bytes": sum(u.num_bytes for u in uploads),
            "seconds": {"aggregate": round(time.perf_counter() - aggregate_start, 3),
                        "round": round(time.perf_counter() - round_start, 3)},
        }
        run.append_metrics(record)
        if cfg.output.checkpoint_every and round_num % cfg.output.checkpoint_every == 0:
            run.save_checkpoint(round_num, global_adapter)
        losses = [c.get("train_loss_private") for c in per_client.values() if c.get("train_loss_private") is not None]
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        progress.round_done(round_num, f"{len(sampled)} clients, mean private loss {mean_loss:.3f}, "
                                       f"{record['seconds']['round']:.0f}s")
        last = round_num == cfg.federation.rounds
        if attack_now and "global" in cfg.privacy.targets:
            _audit(exp, run, auditor, global_adapter, round_num, "global", None, progress)
        if cfg.eval.every > 0 and exp.federation.eval_sets and (round_num % cfg.eval.every == 0 or last):
            _evaluate(exp, run, global_adapter, round_num, progress)
    if cfg.eval.every > 0 and exp.federation.eval_sets:
        _evaluate_personal(exp, run, store, client_ids, progress)
    exp.handle.save_adapter(global_adapter, run.path / "adapter")
    return global_adapter


def _evaluate_personal(exp: Experiment, run: RunDir, store: ClientStateStore, clients: list[str],
                       progress: RunProgress) -> None:
    """Clients that keep a private adapter (FedPIT's persistent option) also get their personalised
    model (base + W_l) evaluated after the last round; the figures are the client's own to report."""
    cfg = exp.config
    options = EvalOptions(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                          max_length=cfg.model.max_length)
    for client in clients:
        private = store.load(client).tensors.get("private")
        if private is None:
            continue
        results = evaluate(exp.handle, exp.fmt, private, exp.federation.eval_sets, options, progress.phase)
        run.append_metrics({"kind": "eval", "method": cfg.method.name, "round": cfg.federation.rounds,
                            "target": "personal", "client": client, "results": results})
        progress.message(f"personalised model of {client}: " + ", ".join(
            f"{name} rougeL {m['rougeL']:.3f}" for name, m in results.items()))
