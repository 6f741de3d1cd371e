"""Attacks on a finished run: rebuild the same federation (same seed, same canaries), load the
adapters the run kept (global checkpoints, uploads, private adapters) and record the figures."""

from __future__ import annotations

from fedpit import config as config_mod
from fedpit.errors import FedpitError
from fedpit.progress import RunProgress
from fedpit.runs import RunDir
from fedpit.runtimes.audit import Auditor, record
from fedpit.runtimes.local import prepare
from fedpit.types import AdapterState


def last_checkpoint_round(run: RunDir) -> int:
    files = (run.path / "checkpoints").glob("global-round-*.safetensors")
    rounds = sorted(int(p.stem.rsplit("-", 1)[1]) for p in files)
    if not rounds:
        raise FedpitError(f"run '{run.path}' has no checkpoints to attack; rerun with output.checkpoint_every=1")
    return rounds[-1]


def attack_run(run: RunDir, round_num: int | None, targets: list[str], attacks: list[str] | None,
               progress: RunProgress) -> list[dict]:
    stored = run.config()
    changes = {"privacy.enabled": True, "privacy.targets": targets}
    if attacks:
        changes["privacy.attacks"] = attacks
    config = config_mod.replace(stored, **changes)
    round_num = last_checkpoint_round(run) if round_num is None else round_num
    exp = prepare(config)
    base = exp.handle.fresh_adapter(0)  # LoRA B starts at zero: a fresh adapter is the base model
    auditor = Auditor.build(config, exp.federation, exp.handle, exp.fmt, exp.canaries, base)
    jobs: list[tuple[str, str | None, AdapterState]] = []
    if "global" in targets:
        jobs.append(("global", None, base if round_num == 0 else run.load_checkpoint(round_num)))
    if "uploads" in targets and stored.flower.secure_aggregation:
        raise FedpitError(f"run '{run.path}' used flower.secure_aggregation: the server never saw an individual "
                          f"upload (uploads not visible to the server), so there are none to attack; attack the "
                          f"global model with --target global")
    if "uploads" in targets:
        uploads = run.load_uploads(round_num)
        if not uploads:
            raise FedpitError(f"run '{run.path}' kept no uploads for round {round_num}; "
                              f"run with --set privacy.enabled=true (privacy.save_uploads=true) to keep them")
        jobs += [("upload", client, tensors) for client, tensors in uploads.items()]
    if "private" in targets:
        private = run.load_client_audit(round_num, "private")
        if not private:
            raise FedpitError(f"run '{run.path}' kept no private adapters for round {round_num}; "
                              f"run with --set privacy.enabled=true --set privacy.targets=['private']")
        jobs += [("private", client, tensors) for client, tensors in private.items()]
    records = []
    for target, client, adapter in jobs:
        progress.phase(f"attack {target} {client or ''}".strip(), 0, 1)
        figures = auditor.attack(adapter, client)
        rec = {**record(round_num, target, figures, client, config.method.name), "source": "fedpit attack"}
        run.append_metrics(rec)
        records.append(rec)
    return records
