"""A run is a directory: resolved config, metrics, checkpoints, final adapter, client-side files.

Layout:
    config.toml            the resolved configuration
    run.json               status (running / complete / failed), timings, federation summary
    metrics.jsonl          one JSON object per round ("kind": "round") and per evaluation ("kind": "eval")
    eval/round-NNN/<set>.jsonl, eval/final/<set>.jsonl
                           every evaluated example: reference, the model's answer, its NLL and ROUGE-L
    checkpoints/           per committed round: global adapter, server state (safetensors) and a
                           manifest with their SHA-256 and the metrics line count (the commit point)
    adapter/               final global LoRA in PEFT format
    clients/<id>/          what stays on the client: state, synthetic samples per round
    report.md, *.png       written by `fedpit report` (and at the end of `fedpit run`)
Files are written atomically (temp file + rename) so a crash never leaves a half-written file;
metrics.jsonl is append-only and cut back to the last committed round on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedpit import config as config_mod
from fedpit.config import Config
from fedpit.errors import FedpitError
from fedpit.faults import failpoint
from fedpit.types import AdapterState

log = logging.getLogger(__name__)
STATE_SEPARATOR = "::"


def private_dir(path: Path) -> Path:
    """Create `path` and every missing parent readable by the user only (run directories and
    client folders hold private examples and adapters); mkdir's mode covers only the last level
    and is cut by the umask, hence the explicit chmod."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    return missing[0] if missing else path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def default_run_dir(config: Config, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{config.name}-{config.method.name}-{stamp}"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, config: Config) -> RunDir:
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FedpitError(f"run directory '{path}' already exists and is not empty; choose another --out")
        private_dir(path)
        os.chmod(path, 0o700)
        run = cls(path)
        atomic_write_text(path / "config.toml", config_mod.dumps(config))
        run.write_status("running")
        return run

    # ------------------------------------------------------------ status and metrics
    def read_status(self) -> dict[str, Any]:
        file = self.path / "run.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def write_status(self, status: str, **extra: Any) -> None:
        data = {**self.read_status(), **extra, "status": status,
                "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write_text(self.path / "run.json", json.dumps(data, indent=2, default=str))

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(finite_json(record), default=_json_default, allow_nan=False) + "\n"
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line[: len(line) // 2])
            handle.flush()
            failpoint("mid_metrics_write")  # a crash here leaves a torn last line, which readers skip
            handle.write(line[len(line) // 2 :])
            handle.flush()
            os.fsync(handle.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        """Every complete record; a last line torn by a crash mid-append is ignored."""
        return [json.loads(line) for line in self._metric_lines()]

    def _metric_lines(self) -> list[str]:
        file = self.path / "metrics.jsonl"
        if not file.is_file():
            return []
        lines = [line for line in file.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        return lines

    def _truncate_metrics(self, keep: int) -> None:
        lines = self._metric_lines()[:keep]
        atomic_write_text(self.path / "metrics.jsonl", "".join(lines))

    def config(self) -> Config:
        return config_mod.load(self.path / "config.toml")

    # ------------------------------------------------------------ checkpoints: commit and restore
    def commit(self, round_num: int, adapter: AdapterState, server_state: dict[str, Any]) -> None:
        """Make round `round_num` durable: global adapter, server state (optimiser moments, control
        variates, counters), then a manifest with their checksums and the number of metrics lines
        written so far. The manifest is the commit point: without it the round never happened."""
        folder = self.path / "checkpoints"
        adapter_file = folder / f"global-round-{round_num:03d}.safetensors"
        state_file = folder / f"server-round-{round_num:03d}.safetensors"
        save_tensors(adapter_file, adapter, {"round": str(round_num)})
        tensors, values = flatten_state(server_state)
        save_tensors(state_file, tensors, {"values": json.dumps(values)})
        failpoint("mid_commit")
        manifest = {"round": round_num, "metrics_lines": len(self._metric_lines()),
                    "sha256": {f.name: _sha256(f) for f in (adapter_file, state_file)},
                    "time": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write_text(folder / f"round-{round_num:03d}.json", json.dumps(manifest, indent=2))

    def committed_rounds(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in (self.path / "checkpoints").glob("round-*.json"))

    def restore(self) -> tuple[int, AdapterState, dict[str, Any]] | None:
        """The newest committed round whose files match their checksums, with metrics cut back to
        it; a corrupt or truncated checkpoint is reported and the one before it is used. None (and
        an empty metrics file) when no round was committed."""
        for round_num in reversed(self.committed_rounds()):
            folder = self.path / "checkpoints"
            try:
                manifest = json.loads((folder / f"round-{round_num:03d}.json").read_text())
                for name, digest in manifest["sha256"].items():
                    if _sha256(folder / name) != digest:
                        raise ValueError(f"{name} does not match its checksum")
                adapter = load_file(folder / f"global-round-{round_num:03d}.safetensors")
                state_file = folder / f"server-round-{round_num:03d}.safetensors"
                values = json.loads(safe_open_metadata(state_file).get("values", "{}"))
                server_state = unflatten_state(load_file(state_file), values)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("checkpoint of round %d in %s is unusable (%s); trying the one before", round_num,
                            self.path, exc)
                continue
            self._truncate_metrics(manifest["metrics_lines"])
            return round_num, adapter, server_state
        self._truncate_metrics(0)
        return None

    # ------------------------------------------------------------ tensors

    def load_checkpoint(self, round_num: int) -> AdapterState:
        return load_file(self.path / "checkpoints" / f"global-round-{round_num:03d}.safetensors")

    def save_upload(self, round_num: int, client: str, tensors: AdapterState) -> None:
        """The server's view of a client in a round, kept so it can be attacked after the fact."""
        if tensors:
            save_tensors(self.path / "uploads" / f"round-{round_num:03d}" / f"{client}.safetensors", tensors)

    def load_uploads(self, round_num: int) -> dict[str, AdapterState]:
        folder = self.path / "uploads" / f"round-{round_num:03d}"
        return {f.stem: load_file(f) for f in sorted(folder.glob("*.safetensors"))}

    # ------------------------------------------------------------ evaluation answers
    def answers_dir(self, stage: str, client: str | None = None) -> Path:
        """`eval/round-NNN` (per-round curve) or `eval/final` (whole sets), with `personal/<client>`
        below it for a client's own model."""
        folder = self.path / "eval" / stage
        return folder / "personal" / client if client else folder

    def save_answers(self, stage: str, name: str, records: list[dict[str, Any]], client: str | None = None) -> Path:
        path = self.answers_dir(stage, client) / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(finite_json(r), allow_nan=False) + "\n" for r in records))
        return path

    def load_answers(self, stage: str, client: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Every set's per-example records of one evaluation ({} when it was not run)."""
        folder = self.answers_dir(stage, client)
        return {f.stem: [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
                for f in sorted(folder.glob("*.jsonl"))}

    # ------------------------------------------------------------ client side
    def save_client_audit(self, client: str, round_num: int, name: str, tensors: AdapterState) -> None:
        save_tensors(self.client_dir(client) / "audit" / f"round-{round_num:03d}-{name}.safetensors", tensors)

    def load_client_audit(self, round_num: int, name: str) -> dict[str, AdapterState]:
        files = sorted((self.path / "clients").glob(f"*/audit/round-{round_num:03d}-{name}.safetensors"))
        return {f.parent.parent.name: load_file(f) for f in files}

    def client_dir(self, client: str) -> Path:
        path = self.path / "clients" / client
        private_dir(path)
        return path



def save_tensors(path: Path, tensors: AdapterState, metadata: dict[str, str] | None = None) -> None:
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def safe_open_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested dicts of tensors and plain values -> (flat tensors, flat JSON values), keys joined
    with '::' (tensor names themselves contain '.' and '/')."""
    import torch

    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{STATE_SEPARATOR}{key}" if prefix else key
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu()
        elif isinstance(value, dict):
            sub_tensors, sub_values = flatten_state(value, name)
            tensors |= sub_tensors
            values |= sub_values
            if not value:
                values[name] = {}
        else:
            values[name] = value
    return tensors, values


def unflatten_state(tensors: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for flat, value in [*values.items(), *tensors.items()]:
        *parents, leaf = flat.split(STATE_SEPARATOR)
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return state


def finite_json(value: Any) -> Any:
    """NaN/inf become None (null): metrics, answers and reports stay strict JSON that any tool can read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, float):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
