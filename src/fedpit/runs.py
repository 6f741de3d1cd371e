"""A run is a directory: resolved config, metrics, checkpoints, final adapter, client-side files.

Layout:
    config.toml            the resolved configuration
    run.json               status (running / complete / failed), timings, federation summary
    metrics.jsonl          one JSON object per round ("kind": "round") and per evaluation ("kind": "eval")
    checkpoints/           global adapter after each round (safetensors)
    adapter/               final global LoRA in PEFT format
    clients/<id>/          what stays on the client: state, synthetic samples per round
    report.md, *.png       written by `fedpit report` (and at the end of `fedpit run`)
Files are written atomically (temp file + rename) so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedpit import config as config_mod
from fedpit.config import Config
from fedpit.errors import FedpitError
from fedpit.types import AdapterState, SyntheticSample


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_finite(record), default=_json_default, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        file = self.path / "metrics.jsonl"
        if not file.is_file():
            return []
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]

    def config(self) -> Config:
        return config_mod.load(self.path / "config.toml")

    # ------------------------------------------------------------ tensors
    def save_checkpoint(self, round_num: int, adapter: AdapterState) -> Path:
        path = self.path / "checkpoints" / f"global-round-{round_num:03d}.safetensors"
        save_tensors(path, adapter, {"round": str(round_num)})
        return path

    def load_checkpoint(self, round_num: int) -> AdapterState:
        return load_file(self.path / "checkpoints" / f"global-round-{round_num:03d}.safetensors")

    def save_upload(self, round_num: int, client: str, tensors: AdapterState) -> None:
        """The server's view of a client in a round, kept so it can be attacked after the fact."""
        if tensors:
            save_tensors(self.path / "uploads" / f"round-{round_num:03d}" / f"{client}.safetensors", tensors)

    def load_uploads(self, round_num: int) -> dict[str, AdapterState]:
        folder = self.path / "uploads" / f"round-{round_num:03d}"
        return {f.stem: load_file(f) for f in sorted(folder.glob("*.safetensors"))}

    # ------------------------------------------------------------ client side
    def save_client_audit(self, client: str, round_num: int, name: str, tensors: AdapterState) -> None:
        save_tensors(self.client_dir(client) / "audit" / f"round-{round_num:03d}-{name}.safetensors", tensors)

    def load_client_audit(self, round_num: int, name: str) -> dict[str, AdapterState]:
        files = sorted((self.path / "clients").glob(f"*/audit/round-{round_num:03d}-{name}.safetensors"))
        return {f.parent.parent.name: load_file(f) for f in files}

    def client_dir(self, client: str) -> Path:
        path = self.path / "clients" / client
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def save_synthetic(self, client: str, round_num: int, samples: list[SyntheticSample]) -> None:
        lines = "".join(json.dumps(asdict(s)) + "\n" for s in samples)
        atomic_write_text(self.client_dir(client) / "synthetic" / f"round-{round_num:03d}.jsonl", lines)


def save_tensors(path: Path, tensors: AdapterState, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """NaN/inf become null: metrics.jsonl stays strict JSON that any tool can read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, float):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
