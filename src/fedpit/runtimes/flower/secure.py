"""Secure aggregation over Flower: SecAgg+ (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Complexity", CCS 2020), Flower's `SecAggPlusWorkflow` on the server and
`secaggplus_mod` on each ClientApp (client_app.secure_mod).

A round becomes four message exchanges (setup, share keys, collect masked vectors, unmask). Each
client quantises its weighted upload w_k * W_a,k (w_k = its example count / the largest count in the
round), adds a private mask and pairwise masks that cancel in the sum, and sends only that; the
server unmasks the sum and divides by the summed weights, so it learns the weighted mean and never
an individual upload. A client that drops out after the keys were shared is survived while at least
`threshold` of its neighbours answer: they hand the server the shares that remove its masks.

Quantisation error (stated in every round record as `error_bound`, and tested): with K contributors,
clipping range c, Q quantisation levels and quantised weights r_k, every element of the secure mean
is within K * 3c / (Q * sum r_k) of the exact weighted mean: stochastic rounding moves each client's
term by less than one step 2c/Q, and rounding r_k to a multiple of 1/Q moves the mean by at most
K * max|W| / (Q * sum r_k) <= K * c / (Q * sum r_k).

What the server still sees: which clients took part, their example counts, timings and synthetic-
data counts. Training losses are withheld (they come from one client's private examples).

Under client-level DP every client clips its own update W_a,k - W_g to the bound S before masking
and weighs 1, so the secure mean is W_g plus the mean clipped update; the server adds the noise to
the sum as in DP-FedAvg. The server is then trusted to add that noise (central DP, as before), but
never sees an individual update.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedpit.config import Config
from fedpit.errors import ConfigError, FedpitError
from fedpit.privacy.client_dp import clip_update
from fedpit.runtimes.flower import codec
from fedpit.runtimes.server import ClientReport, RoundPlan, SecureAggregate
from fedpit.types import AdapterState, ClientUpload

log = logging.getLogger(__name__)
WITHHELD_PREFIX = "train_loss"


def check_method(config: Config, method) -> None:
    """SecAgg+ hands the server one mean: only a method whose server rule needs no more can use it."""
    if config.flower.secure_aggregation and not method.mean_aggregation:
        raise ConfigError(
            f"flower.secure_aggregation cannot carry method '{config.method.name}': its server rule needs the "
            f"individual uploads (or control variates), and secure aggregation shows the server only their "
            f"weighted mean; use fedavg, fedprox, fedpit, fedmit or the FedOPT family, or switch it off")


# ---------------------------------------------------------------------------------------- client side
def secure_upload(upload: ClientUpload, global_adapter: AdapterState, config: Config) -> tuple[AdapterState, int]:
    """What this client feeds into the masked sum, and its weight. Refuses an upload the quantiser would
    clip (it would corrupt the mean silently) and one with extra tensors (they would travel unmasked)."""
    if upload.extras:
        raise FedpitError(f"secure aggregation cannot carry the extra tensors {sorted(upload.extras)}")
    for key in [k for k in upload.metrics if k.startswith(WITHHELD_PREFIX)]:
        del upload.metrics[key]
    if config.privacy.client_dp.enabled:
        delta, cut = clip_update(upload.tensors, global_adapter, config.privacy.client_dp.clip_norm)
        upload.metrics["client_dp_clipped"] = float(cut)
        tensors, weight = {k: (global_adapter[k].double() + delta[k]).float() for k in global_adapter}, 1
    else:
        tensors, weight = upload.tensors, upload.num_examples
    bound = config.flower.secagg_clipping_range
    largest = max(float(t.abs().max()) for t in tensors.values())
    if largest > bound:
        raise FedpitError(f"an upload value reaches {largest:.3g}, outside flower.secagg_clipping_range={bound:g}: "
                          f"SecAgg+ would clip it and corrupt the mean; raise flower.secagg_clipping_range")
    return tensors, weight


# ---------------------------------------------------------------------------------------- server side
class _Node(ClientProxy):
    """The workflow addresses clients through proxies; it only reads their node ids."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class _OneRound(Strategy):
    """The strategy the workflow expects, reduced to one round: fedpit's server loop has already
    chosen the clients and built their instructions; this hands them over and keeps the unmasked
    mean (which the workflow puts in every result's parameters)."""

    def __init__(self, instructions: dict[int, FitIns]) -> None:
        self.instructions = instructions
        self.results: list | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(node), ins) for node, ins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class CountingGrid:
    """The grid, counting the bytes of every message per node in both directions (the ServerApp counts
    every round this way; a secure round also reads its own per-client figures off one)."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.sent: dict[int, int] = defaultdict(int)
        self.received: dict[int, int] = defaultdict(int)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            self.sent[message.metadata.dst_node_id] += codec.message_bytes(message.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self.received[reply.metadata.src_node_id] += codec.message_bytes(reply.content)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _count(value: float) -> int | float:
    """Our settings are floats; Flower reads an int as a count and a float as a fraction."""
    return int(value) if value > 1 else float(value)


def secure_round(grid, context: Context, node_of: dict[str, int], examples: dict[str, int], plan: RoundPlan,
                 config: Config, config_toml: str) -> tuple[list[ClientReport], dict[str, str], SecureAggregate | None]:
    """One round under SecAgg+: the reports (numbers only), the clients dropped with the reason, and the
    secure mean (None when too few clients stayed for the masks to be removed)."""
    flower = config.flower
    dropped: dict[str, str] = {}
    client_of: dict[int, str] = {}
    keys = sorted(plan.global_adapter)
    instructions: dict[int, FitIns] = {}
    for client in plan.sampled:
        if client not in node_of:
            dropped[client] = "not connected"
            continue
        client_of[node_of[client]] = client
        instructions[node_of[client]] = codec.encode_secure_request(
            plan.round_num, plan.learning_rate, client, config_toml, plan.global_adapter, keys)
    if len(instructions) < 2:
        reason = "secure aggregation needs at least two connected clients a round"
        dropped.update({c: reason for c in client_of.values()})
        return [], dropped, None
    dp = config.privacy.client_dp.enabled
    max_weight = 1.0 if dp else float(max(examples[c] for c in client_of.values()))
    strategy = _OneRound(instructions)
    legacy = LegacyContext(context, strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: plan.round_num})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=_count(flower.secagg_shares), reconstruction_threshold=_count(flower.secagg_threshold),
        max_weight=max_weight, clipping_range=flower.secagg_clipping_range,
        quantization_range=flower.secagg_quantization_range, timeout=config.federation.reply_timeout or None)
    counting = CountingGrid(grid)
    workflow(counting, legacy)
    if not strategy.results:
        reason = ("secure aggregation halted: too few clients stayed to remove the masks "
                  "(flower.secagg_threshold); see the SuperLink's log")
        dropped.update({c: reason for c in client_of.values()})
        return [], dropped, None
    reports, weights = [], []
    mean: AdapterState = {}
    for proxy, fitres in strategy.results:
        client = client_of[proxy.node_id]
        metrics, seconds = codec.decode_secure_metrics(fitres.metrics)
        reports.append(ClientReport(
            upload=ClientUpload(client=client, tensors={}, num_examples=examples[client], metrics=metrics),
            phase_seconds=seconds, wire_bytes=counting.received[proxy.node_id]))
        weights.append(round(fitres.num_examples / max_weight * flower.secagg_quantization_range))
        if not mean:
            arrays = parameters_to_ndarrays(fitres.parameters)
            mean = {k: torch.from_numpy(a).reshape(plan.global_adapter[k].shape).float() for k, a in zip(keys, arrays)}
    for client in client_of.values():
        if client not in {r.upload.client for r in reports}:
            dropped[client] = "dropped out of the secure round; the others' shares removed its masks"
    order = {c: i for i, c in enumerate(plan.sampled)}
    reports.sort(key=lambda r: order[r.upload.client])
    summed = sum(weights) / flower.secagg_quantization_range
    bound = len(reports) * 3 * flower.secagg_clipping_range / (flower.secagg_quantization_range * summed)
    record = {"error_bound": bound, "threshold": flower.secagg_threshold, "shares": flower.secagg_shares,
              "bytes_sent": sum(counting.sent.values()), "bytes_received": sum(counting.received.values())}
    total = float(len(reports)) if dp else float(sum(r.upload.num_examples for r in reports))
    return reports, dropped, SecureAggregate(mean=mean, total_weight=total, contributors=len(reports), record=record)
