"""Client-private state on disk, in the client's own folder. Only runtimes read or write it."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from fedpit.runs import atomic_write_text, save_tensors
from fedpit.types import ClientState


class ClientStateStore:
    """Keeps each client's `ClientState` in `<folder>/<client>/state.*` between rounds, so memory
    holds only the client that is running."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _paths(self, client: str) -> tuple[Path, Path]:
        base = self.folder / client
        return base / "state.safetensors", base / "state.json"

    def load(self, client: str) -> ClientState:
        tensor_file, value_file = self._paths(client)
        state = ClientState()
        if tensor_file.is_file():
            for key, tensor in load_file(tensor_file).items():
                group, name = key.split("/", 1)
                state.tensors.setdefault(group, {})[name] = tensor
        if value_file.is_file():
            state.values = json.loads(value_file.read_text())
        return state

    def save(self, client: str, state: ClientState) -> None:
        tensor_file, value_file = self._paths(client)
        flat = {f"{group}/{name}": t for group, tensors in state.tensors.items() for name, t in tensors.items()}
        if flat:
            save_tensors(tensor_file, flat)
        if state.values:
            atomic_write_text(value_file, json.dumps(state.values))
