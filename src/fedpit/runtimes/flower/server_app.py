"""The Flower ServerApp: fedpit's server loop with Flower carrying the messages.

Sampling, aggregation (the method's own server rule), evaluation, checkpoints and resume are the
shared `Server`'s, exactly as in the in-process simulator; this file only finds which SuperNode
holds which client, sends each sampled client its round, and collects the replies. A node that
fails or does not answer in time is dropped from the round (recorded under "dropped" in the
round's metrics); the round aggregates what arrived if at least `federation.min_replies` did.

Run config keys (`flwr run ... --run-config "config='/abs/exp.toml' run-dir='/abs/runs/x'"`):
    config     the experiment TOML on the server machine
    run-dir    the run directory to write (resumed when it holds a checkpoint and resume=true)
    resume     continue run-dir from its last checkpoint
    clients    how many SuperNodes to wait for (default: data.partition.num_clients)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpit import config as config_mod
from fedpit.config import Config
from fedpit.errors import FedpitError
from fedpit.methods import METHODS
from fedpit.progress import RunProgress
from fedpit.report import write_report
from fedpit.runtimes.flower import codec
from fedpit.runtimes.flower.secure import CountingGrid, check_method, secure_round
from fedpit.runtimes.local import open_run, prepare
from fedpit.runtimes.server import ClientReport, RoundPlan, Server

log = logging.getLogger(__name__)
SETTINGS_ENV = "FEDPIT_FLOWER_SETTINGS"
"""Simulation passes its settings here (run_simulation has no run config)."""

app = ServerApp()


@dataclass
class ServerSettings:
    config: Config
    run_dir: Path
    resume: bool = False
    clients: int = 0

    @classmethod
    def from_context(cls, context: Context) -> ServerSettings:
        given = {**dict(context.run_config), **json.loads(os.environ.get(SETTINGS_ENV, "{}"))}
        if "config-text" in given:
            config = config_mod.loads(str(given["config-text"]))
        elif given.get("config"):
            config = config_mod.load(str(given["config"]))
        else:
            raise FedpitError("the ServerApp needs run config 'config' (path of the experiment TOML)")
        if not given.get("run-dir"):
            raise FedpitError("the ServerApp needs run config 'run-dir' (where to write the run)")
        return cls(config=config, run_dir=Path(str(given["run-dir"])), resume=bool(given.get("resume", False)),
                   clients=int(given.get("clients", 0)))


class Directory:
    """Which SuperNode holds which client. Nodes are asked once; a restarted SuperNode comes back
    under a new node id and is asked again."""

    def __init__(self, grid: Grid, config_toml: str, timeout: float) -> None:
        self.grid = grid
        self.config_toml = config_toml
        self.timeout = timeout
        self.node_of: dict[str, int] = {}
        self.examples: dict[str, int] = {}
        self._asked: set[int] = set()

    def refresh(self) -> None:
        nodes = set(self.grid.get_node_ids())
        new = sorted(nodes - self._asked)
        if not new:
            return
        messages = [Message(RecordDict({codec.ROUND: ConfigRecord({"config": self.config_toml})}),
                            dst_node_id=node, message_type="query") for node in new]
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                log.warning("node %s could not identify itself: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            client, count = codec.decode_identity(reply.content)
            self.node_of[client] = reply.metadata.src_node_id
            self.examples[client] = count
            self._asked.add(reply.metadata.src_node_id)
        self.node_of = {c: n for c, n in self.node_of.items() if n in nodes}

    def wait_for(self, expected: int, patience: float) -> list[str]:
        deadline = time.monotonic() + patience
        while True:
            self.refresh()
            if len(self.node_of) >= expected or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if len(self.node_of) < expected:
            raise FedpitError(f"{len(self.node_of)} of {expected} clients connected within {patience:.0f}s "
                              f"({sorted(self.node_of)}); start the missing SuperNodes or raise flower.wait_for_nodes")
        return sorted(self.node_of)


def send_round(grid: Grid, directory: Directory, plan: RoundPlan, config: Config,
               config_toml: str) -> tuple[list[ClientReport], dict[str, str]]:
    """The sampled clients' replies in sampling order (so aggregation adds them in the same order as
    in process), and the clients dropped with the reason."""
    directory.refresh()
    dropped: dict[str, str] = {}
    messages: dict[str, Message] = {}
    for client in plan.sampled:
        if client not in directory.node_of:
            dropped[client] = "not connected"
            continue
        content = codec.encode_request(plan.round_num, plan.learning_rate, client, config_toml,
                                       plan.global_adapter, plan.broadcast, config.flower.transport)
        messages[client] = Message(content, dst_node_id=directory.node_of[client], message_type="train",
                                   group_id=str(plan.round_num))
    timeout = config.federation.reply_timeout or None
    replies = list(grid.send_and_receive(list(messages.values()), timeout=timeout))
    client_of = {m.metadata.message_id: c for c, m in messages.items()}
    received: dict[str, ClientReport] = {}
    for reply in replies:
        client = client_of.get(reply.metadata.reply_to_message_id)
        if client is None:
            continue
        if reply.has_error():
            reason = (reply.error.reason or "").strip().splitlines()
            dropped[client] = f"error {reply.error.code}: {reason[-1][:300] if reason else 'no reason given'}"
            continue
        report = codec.decode_reply(reply.content)
        report.wire_bytes = codec.wire_bytes(reply.content)
        received[client] = report
    for client in messages:
        if client not in received and client not in dropped:
            dropped[client] = f"no reply within {timeout:.0f}s" if timeout else "no reply"
    return [received[c] for c in plan.sampled if c in received], dropped


def check_config(config: Config) -> None:
    """What the Flower runtime cannot do, said before anything starts."""
    if config.method.name in ("centralized", "local", "local_sg"):
        raise FedpitError(f"method '{config.method.name}' does not federate; run it with the local runtime")
    check_method(config, METHODS.get(config.method.name))
    if config.privacy.enabled and config.flower.secure_aggregation:
        raise FedpitError("the privacy audit attacks the uploads the server sees, and under "
                          "flower.secure_aggregation it sees none (uploads not visible to the server); attack the "
                          "global model of the finished run with `fedpit attack RUN_DIR --target global`")
    if config.privacy.enabled:
        raise FedpitError("the privacy audit needs every client's data in one process: run it with the local "
                          "runtime (--runtime local), or attack a Flower run afterwards with `fedpit attack RUN_DIR`")


def serve(grid: Grid, settings: ServerSettings, context: Context, progress: RunProgress | None = None) -> Path:
    """Run (or resume) the experiment over the nodes of `grid`; returns the run directory."""
    config = settings.config
    check_config(config)
    progress = progress or RunProgress(quiet=True)
    config_toml = config_mod.dumps(config)
    exp = prepare(config)  # the server's model (evaluation) and the public evaluation sets
    run = open_run(exp, settings.run_dir, resume=settings.resume)
    start = time.perf_counter()
    try:
        server = Server(config, exp.method, exp.handle, exp.fmt, exp.federation.eval_sets, run, progress,
                        final_sets=exp.federation.final_sets)
        directory = Directory(grid, config_toml, timeout=config.flower.wait_for_nodes)
        expected = settings.clients or config.data.partition.num_clients
        client_ids = directory.wait_for(expected, config.flower.wait_for_nodes)
        server.start(client_ids)
        for round_num in server.rounds():
            plan = server.plan(round_num, client_ids)
            counting = CountingGrid(grid)
            if config.flower.secure_aggregation:
                directory.refresh()
                reports, dropped, secure = secure_round(counting, context, directory.node_of, directory.examples,
                                                        plan, config, config_toml)
            else:
                (reports, dropped), secure = send_round(counting, directory, plan, config, config_toml), None
            wire = {"down": sum(counting.sent.values()), "up": sum(counting.received.values())}
            server.complete_round(plan, reports, dropped, secure=secure, wire=wire)
        server.finish()
    except BaseException as exc:
        run.write_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run.write_status("complete", seconds=round(time.perf_counter() - start, 1), runtime="flower")
    write_report(run.path)
    return run.path


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, ServerSettings.from_context(context), context)
