"""The only file that speaks Flower's record types: what the server sends to a client in a round
and what a client sends back, as `RecordDict`s.

Down (server -> client): the global adapter, the method's broadcast tensors (e.g. SCAFFOLD's c),
and a ConfigRecord with the round, the learning rate, the client expected on that node and the
resolved config as TOML text (so a SuperNode needs no copy of the experiment config).
Up (client -> server): exactly a `ClientUpload` (adapter tensors, extras, example count, numeric
metrics) plus seconds per phase. No text, no private state: `decode_reply` rejects anything else.

bf16 transport: numpy (which Flower's arrays use) has no bfloat16, so bf16 tensors travel as their
16-bit patterns (an int16 view) with their names listed in the record; they are widened back to
fp32 before aggregation, so only the wire is half-size.

Secure rounds (SecAgg+, see secure.py) speak the records Flower's workflow and client mod expect:
a FitIns down (the global adapter as arrays in sorted key order, the same settings as above) and a
FitRes up (the weighted upload, which the mod masks and removes before it leaves, its weight, and
the numeric metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedpit.runtimes.server import ClientReport
from fedpit.types import AdapterState, ClientUpload

GLOBAL = "global"
BROADCAST = "broadcast."
EXTRA = "extra."
UPLOAD = "upload"
ROUND = "round"
META = "meta"
METRICS = "metrics"
SECONDS = "seconds."
REPLY_KEYS_FIXED = {UPLOAD, META, METRICS}


def pack(tensors: AdapterState, transport: str = "fp32") -> tuple[ArrayRecord, str]:
    """Tensors -> an ArrayRecord and the comma-separated names sent as bf16 bit patterns."""
    packed, narrowed = {}, []
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if transport == "bf16" and tensor.is_floating_point():
            packed[name] = tensor.to(torch.bfloat16).view(torch.int16)
            narrowed.append(name)
        else:
            packed[name] = tensor
    return ArrayRecord(packed), ",".join(narrowed)


def unpack(record: ArrayRecord, narrowed: str) -> AdapterState:
    names = set(filter(None, narrowed.split(",")))
    state = record.to_torch_state_dict()
    return {k: v.view(torch.bfloat16).float() if k in names else v for k, v in state.items()}


@dataclass
class RoundRequest:
    """A decoded train message, as the client sees it."""

    round_num: int
    learning_rate: float
    client: str
    config_toml: str
    global_adapter: AdapterState
    broadcast: dict[str, AdapterState]


def encode_request(round_num: int, learning_rate: float, client: str, config_toml: str,
                   global_adapter: AdapterState, broadcast: dict[str, AdapterState], transport: str) -> RecordDict:
    content = RecordDict()
    narrowed = {}
    content[GLOBAL], narrowed[GLOBAL] = pack(global_adapter, transport)
    for name, tensors in broadcast.items():
        content[BROADCAST + name], narrowed[BROADCAST + name] = pack(tensors, transport)
    content[ROUND] = ConfigRecord({"round": round_num, "learning-rate": learning_rate, "client": client,
                                   "config": config_toml, "transport": transport,
                                   **{f"bf16:{k}": v for k, v in narrowed.items()}})
    return content


def decode_request(content: RecordDict) -> RoundRequest:
    info = content[ROUND]

    def tensors(key: str) -> AdapterState:
        return unpack(content[key], str(info.get(f"bf16:{key}", "")))

    broadcast = {k[len(BROADCAST):]: tensors(k) for k in content.array_records if k.startswith(BROADCAST)}
    return RoundRequest(round_num=int(info["round"]), learning_rate=float(info["learning-rate"]),
                        client=str(info["client"]), config_toml=str(info["config"]),
                        global_adapter=tensors(GLOBAL), broadcast=broadcast)


def encode_reply(upload: ClientUpload, phase_seconds: dict[str, float], transport: str) -> RecordDict:
    content = RecordDict()
    narrowed = {}
    content[UPLOAD], narrowed[UPLOAD] = pack(upload.tensors, transport)
    for name, tensors in upload.extras.items():
        content[EXTRA + name], narrowed[EXTRA + name] = pack(tensors, transport)
    content[META] = ConfigRecord({"client": upload.client, "num-examples": upload.num_examples,
                                  **{f"bf16:{k}": v for k, v in narrowed.items()}})
    content[METRICS] = MetricRecord({**upload.metrics, **{SECONDS + k: v for k, v in phase_seconds.items()}})
    return content


def decode_reply(content: RecordDict) -> ClientReport:
    """A client's reply -> the server's record of it. Anything beyond the upload is refused, so a
    client cannot (by a bug) ship private records to the server."""
    unexpected = [k for k in content if k not in REPLY_KEYS_FIXED and not k.startswith(EXTRA)]
    if unexpected:
        raise ValueError(f"a client reply carries unexpected records {unexpected}")
    meta = content[META]

    def tensors(key: str) -> AdapterState:
        return unpack(content[key], str(meta.get(f"bf16:{key}", "")))

    metrics = dict(content[METRICS])
    seconds = {k[len(SECONDS):]: float(metrics.pop(k)) for k in list(metrics) if k.startswith(SECONDS)}
    upload = ClientUpload(
        client=str(meta["client"]), tensors=tensors(UPLOAD), num_examples=int(meta["num-examples"]),
        metrics={k: float(v) for k, v in metrics.items()},
        extras={k[len(EXTRA):]: tensors(k) for k in content.array_records if k.startswith(EXTRA)},
    )
    return ClientReport(upload=upload, phase_seconds=seconds)


def wire_bytes(content: RecordDict) -> int:
    """Bytes of the tensors in a message as they travel."""
    return sum(record.count_bytes() for record in content.array_records.values())


def encode_identity(client: str, num_examples: int) -> RecordDict:
    return RecordDict({META: ConfigRecord({"client": client, "num-examples": num_examples})})


def decode_identity(content: RecordDict) -> tuple[str, int]:
    meta = content[META]
    return str(meta["client"]), int(meta["num-examples"])


def message_bytes(content: RecordDict) -> int:
    """Bytes of everything in a message (tensors, masked vectors, keys and shares, settings); a number
    counts 8 bytes, as protobuf carries it (Flower's own count rejects some lists SecAgg+ sends)."""

    def size(value) -> int:
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return len(value) if isinstance(value, (str, bytes)) else 1 if isinstance(value, bool) else 8

    total = sum(record.count_bytes() for record in content.array_records.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        total += sum(len(key) + size(value) for key, value in record.items())
    return total


def encode_secure_request(round_num: int, learning_rate: float, client: str, config_toml: str,
                          global_adapter: AdapterState, keys: list[str]) -> FitIns:
    arrays = [global_adapter[k].detach().cpu().float().numpy() for k in keys]
    return FitIns(parameters=ndarrays_to_parameters(arrays),
                  config={"round": round_num, "learning-rate": learning_rate, "client": client,
                          "config": config_toml, "keys": ",".join(keys)})


def is_secure_request(content: RecordDict) -> bool:
    return "fitins.parameters" in content.array_records


def decode_secure_request(content: RecordDict) -> tuple[RoundRequest, list[str]]:
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    keys = str(ins.config["keys"]).split(",")
    arrays = [torch.from_numpy(a.copy()) for a in parameters_to_ndarrays(ins.parameters)]
    request = RoundRequest(round_num=int(ins.config["round"]), learning_rate=float(ins.config["learning-rate"]),
                           client=str(ins.config["client"]), config_toml=str(ins.config["config"]),
                           global_adapter=dict(zip(keys, arrays, strict=True)), broadcast={})
    return request, keys


def encode_secure_reply(tensors: AdapterState, keys: list[str], weight: int, metrics: dict[str, float],
                        phase_seconds: dict[str, float]) -> RecordDict:
    arrays = [tensors[k].detach().cpu().float().numpy() for k in keys]
    scalars = {**{k: float(v) for k, v in metrics.items()}, **{SECONDS + k: float(v) for k, v in phase_seconds.items()}}
    return compat.fitres_to_recorddict(FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays),
                                              num_examples=weight, metrics=scalars), keep_input=True)


def decode_secure_metrics(scalars: dict) -> tuple[dict[str, float], dict[str, float]]:
    metrics = {k: float(v) for k, v in scalars.items()}
    seconds = {k[len(SECONDS):]: metrics.pop(k) for k in list(metrics) if k.startswith(SECONDS)}
    return metrics, seconds
