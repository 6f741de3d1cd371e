"""The Flower ClientApp: one institution's side, running the method's client rule unchanged.

Which client a SuperNode is comes from its node config:
    client-id='clinic-a' data-file='/data/clinic-a.jsonl'   its own local data file (deployment), or
    partition-id=N                                            client N of the federation the config builds
                                                              (simulation, and demos on shared data);
    state-dir='/var/lib/fedpit'                               where its private state lives (default: see below).
The experiment config arrives as TOML inside every message, so a SuperNode needs no copy of it.

Private state (persistent private adapter, SCAFFOLD's variate) and synthetic samples live in the
state folder on the node's own disk, versioned by round, so a SuperNode restarted between rounds
(or in the middle of one) continues exactly. The base model is loaded once per process and kept
for every later message.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedpit import config as config_mod
from fedpit.errors import FedpitError

if TYPE_CHECKING:
    from fedpit.config import Config
    from fedpit.model import ModelHandle
    from fedpit.prompts import PromptFormat
    from fedpit.runtimes.client import ClientRunner
    from fedpit.types import Example

# Flower starts a fresh process for every message, so what this module imports is paid per message:
# torch, transformers and the model are imported only by the handlers that train (a SecAgg+ round's
# key exchanges never need them).

log = logging.getLogger(__name__)
STATE_DIR_ENV = "FEDPIT_FLOWER_STATE_DIR"

def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """SecAgg+'s client half on the messages of a secure round only; every other message passes."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_mod])


@dataclass
class _Worker:
    """What a process keeps between messages: the model, and per config the client's data and rule."""

    config_toml: str
    config: Config
    method: Any
    handle: ModelHandle
    fmt: PromptFormat
    client: str
    examples: list[Example]
    runner: ClientRunner
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds this process spent before it could train (reported once, with its first round)."""


_WORKER: dict[str, _Worker] = {}
_FEDERATION: dict[str, Any] = {}


def _process_age() -> float:
    """Seconds since this process started: imports and Flower's hand-over before the first message."""
    try:
        started = float(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - started, 0.0)


def _state_dir(context: Context, client: str) -> Path:
    configured = context.node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV)
    root = Path(str(configured)).expanduser() if configured else Path.home() / ".cache" / "fedpit" / "supernode"
    return root


def _identify(config: Config, handle: ModelHandle, context: Context) -> tuple[str, list[Example], list[Example]]:
    """This node's client name, its private examples, and the public demonstrations (when configured)."""
    from fedpit.data.federation import build_federation, load_client_file, public_pool

    node = context.node_config
    if "data-file" in node:
        client = str(node.get("client-id") or Path(str(node["data-file"])).stem)
        public = public_pool(config, handle.tokenizer, None, None) if config.synth.demonstrations == "public" else []
        return client, load_client_file(config, handle.tokenizer, str(node["data-file"]), client), public
    if "partition-id" not in node:
        raise FedpitError("this SuperNode has neither data-file nor partition-id in its --node-config; "
                          "start it with --node-config \"client-id='NAME' data-file='PATH'\"")
    key = config_mod.dumps(config)
    if key not in _FEDERATION:  # a simulation process serves many nodes of the same federation: build it once
        _FEDERATION.clear()
        _FEDERATION[key] = build_federation(config, handle.tokenizer)
    federation = _FEDERATION[key]
    clients = sorted(federation.clients)
    index = int(node["partition-id"])
    if not 0 <= index < len(clients):
        raise FedpitError(f"partition-id {index} is outside the federation's {len(clients)} clients")
    return clients[index], federation.clients[clients[index]], federation.public


def worker(config_toml: str, context: Context) -> _Worker:
    """The process's worker for this config, built once (model loaded once, reused when compatible)."""
    key = f"{context.node_id}:{config_toml}"
    if key in _WORKER:
        return _WORKER[key]
    age, start = _process_age(), time.perf_counter()
    from fedpit.methods import build_method
    from fedpit.model import load_model
    from fedpit.prompts import make_format
    from fedpit.runtimes.client import ClientRunner

    config = config_mod.loads(config_toml)
    method = build_method(config)
    previous = next(iter(_WORKER.values()), None)
    if previous is not None and previous.handle.compatible(config.model, config.lora):
        handle = previous.handle
    else:
        handle = load_model(config.model, config.lora, seed=config.seed)
    fmt = make_format(config.prompt.template, handle.tokenizer)
    client, examples, public = _identify(config, handle, context)
    runner = ClientRunner(config, method, handle, fmt, _state_dir(context, client), public)
    startup = {"process_start": age, "model_and_data_load": time.perf_counter() - start}
    _WORKER[key] = _Worker(config_toml, config, method, handle, fmt, client, examples, runner, startup)
    return _WORKER[key]


def _with_startup(w: _Worker, seconds: dict[str, float]) -> dict[str, float]:
    startup, w.startup = w.startup, {}
    return {**seconds, **startup}


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is and how many examples it holds (its FedAvg weight)."""
    from fedpit.runtimes.flower import codec

    w = worker(str(msg.content[codec.ROUND]["config"]), context)
    return Message(content=codec.encode_identity(w.client, len(w.examples)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedpit.runtimes.flower import codec

    if codec.is_secure_request(msg.content):
        return _train_secure(msg, context)
    request = codec.decode_request(msg.content)
    w = worker(request.config_toml, context)
    if request.client != w.client:
        raise FedpitError(f"the server addressed client '{request.client}' but this node is '{w.client}'")
    result = w.runner.run_round(w.client, w.examples, request.round_num, request.global_adapter,
                                request.learning_rate, request.broadcast)
    content = codec.encode_reply(result.upload, _with_startup(w, result.phase_seconds),
                                             w.config.flower.transport)
    return Message(content=content, reply_to=msg)


def _train_secure(msg: Message, context: Context) -> Message:
    """A secure round's training step: the reply's upload is masked by `secure_mod` before it leaves."""
    from fedpit.runtimes.flower import codec
    from fedpit.runtimes.flower.secure import secure_upload

    request, keys = codec.decode_secure_request(msg.content)
    w = worker(request.config_toml, context)
    if request.client != w.client:
        raise FedpitError(f"the server addressed client '{request.client}' but this node is '{w.client}'")
    result = w.runner.run_round(w.client, w.examples, request.round_num, request.global_adapter,
                                request.learning_rate, {})
    tensors, weight = secure_upload(result.upload, request.global_adapter, w.config)
    content = codec.encode_secure_reply(tensors, keys, weight, result.upload.metrics,
                                        _with_startup(w, result.phase_seconds))
    return Message(content=content, reply_to=msg)
