"""One client's round, as every runtime runs it: load the client's private state, call the method's
client rule, keep what stays on the client (state, synthetic samples) in the client's folder, and
hand back the result whose `upload` alone may travel."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fedpit.config import Config
from fedpit.faults import failpoint
from fedpit.methods import ClientContext, Method
from fedpit.methods.base import ProgressCallback
from fedpit.model import ModelHandle
from fedpit.privacy.dp import RecordDP
from fedpit.prompts import PromptFormat
from fedpit.runs import atomic_write_text
from fedpit.runtimes.state import ClientStateStore
from fedpit.seeding import derive_seed
from fedpit.types import AdapterState, ClientResult, ClientState, Example


class ClientRunner:
    """A client's side: its examples, its folder, and the shared model it borrows for a round."""

    def __init__(self, config: Config, method: Method, handle: ModelHandle, fmt: PromptFormat,
                 folder: Path, public: list[Example] | None = None) -> None:
        self.config = config
        self.method = method
        self.handle = handle
        self.fmt = fmt
        self.folder = Path(folder)
        self.public = public or []
        self.store = ClientStateStore(self.folder, keep=config.output.checkpoint_every + 1)

    def run_round(self, client: str, examples: list[Example], round_num: int, global_adapter: AdapterState,
                  learning_rate: float, broadcast: dict[str, AdapterState],
                  on_progress: ProgressCallback | None = None) -> ClientResult:
        state = self.store.load(client, round_num)
        dp = self.record_dp(client, len(examples), state, round_num)
        ctx = ClientContext(
            client=client, round=round_num, examples=examples, state=state,
            handle=self.handle, fmt=self.fmt, config=self.config, learning_rate=learning_rate,
            seed=derive_seed(self.config.seed, "client", client, round_num), broadcast=broadcast,
            on_progress=on_progress, dp=dp, public=self.public,
        )
        result = self.method.client_update(ctx, global_adapter)
        if dp is not None:
            _report_dp(result, dp)
        # Which round's private state this round started from: shows a restarted node resumed it.
        result.upload.metrics["state_from_round"] = float(self.store.version_before(client, round_num))
        failpoint("after_client_update")
        self.store.save(client, round_num, result.state)
        if self.config.output.save_synthetic and result.synthetic:
            lines = "".join(json.dumps(asdict(s)) + "\n" for s in result.synthetic)
            atomic_write_text(self.folder / client / "synthetic" / f"round-{round_num:03d}.jsonl", lines)
        return result

    def record_dp(self, client: str, num_examples: int, state: ClientState, round_num: int) -> RecordDP | None:
        """The client's DP-SGD budget for this round, from its private state (None without privacy.dp)."""
        if not self.config.privacy.dp.enabled:
            return None
        passes = [self.method.private_passes(r) for r in range(1, self.config.federation.rounds + 1)]
        return RecordDP.open(self.config, passes, client, num_examples, state.values.get("dp"),
                             self.folder / client, round_num)


def _report_dp(result: ClientResult, dp: RecordDP) -> None:
    """Keep the accountant in the client's state; tell the server the epsilon spent, and withhold the
    training losses: they are computed on private examples without noise, so no guarantee covers them."""
    result.state.values["dp"] = dp.state()
    metrics = result.upload.metrics
    for key in [k for k in metrics if k.startswith("train_loss")]:
        del metrics[key]
    metrics.update(dp.metrics())
