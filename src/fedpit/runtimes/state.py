"""Client-private state on disk, in the client's own folder. Only runtimes read or write it.

State is versioned by round: the state a client leaves after round r is
`<folder>/<client>/state/round-NNN.*`, and round r starts from the newest version before r. A
run resumed at round r therefore sees exactly the state it saw the first time, even if the
client had already finished round r (or later rounds) before the run was stopped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file

from fedpit.runs import atomic_write_text, save_tensors
from fedpit.types import ClientState

_VERSION = re.compile(r"round-(\d+)\.(safetensors|json)$")


class ClientStateStore:
    """Keeps each client's `ClientState` between rounds, so memory holds only the running client.

    `keep` versions are kept per client: enough that one always predates the last checkpoint
    (output.checkpoint_every + 1), which is what a resume needs.
    """

    def __init__(self, folder: Path, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = max(2, keep)

    def _dir(self, client: str) -> Path:
        return self.folder / client / "state"

    def _versions(self, client: str) -> list[int]:
        folder = self._dir(client)
        if not folder.is_dir():
            return []
        return sorted({int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.match(p.name))})

    def version_before(self, client: str, before_round: int) -> int:
        """The round whose state `load(client, before_round)` returns; 0 for a fresh client."""
        return max((v for v in self._versions(client) if v < before_round), default=0)

    def load(self, client: str, before_round: int) -> ClientState:
        """The state the client had at the start of `before_round`."""
        versions = [v for v in self._versions(client) if v < before_round]
        state = ClientState()
        if not versions:
            return state
        base = self._dir(client) / f"round-{versions[-1]:03d}"
        tensor_file, value_file = base.with_suffix(".safetensors"), base.with_suffix(".json")
        if tensor_file.is_file():
            for key, tensor in load_file(tensor_file).items():
                group, name = key.split("/", 1)
                state.tensors.setdefault(group, {})[name] = tensor
        if value_file.is_file():
            state.values = json.loads(value_file.read_text())
        return state

    def save(self, client: str, round_num: int, state: ClientState) -> None:
        base = self._dir(client) / f"round-{round_num:03d}"
        flat = {f"{group}/{name}": t for group, tensors in state.tensors.items() for name, t in tensors.items()}
        # Values first, tensors last: a version counts once either file exists, and both are atomic.
        atomic_write_text(base.with_suffix(".json"), json.dumps(state.values))
        if flat:
            save_tensors(base.with_suffix(".safetensors"), flat)
        for old in self._versions(client)[: -self.keep]:
            for suffix in (".safetensors", ".json"):
                (self._dir(client) / f"round-{old:03d}{suffix}").unlink(missing_ok=True)
