"""Every registered method runs one round on the tiny model and keeps the invariants: uploads carry
only adapter tensors (or nothing), numeric metrics, and the run completes."""

from __future__ import annotations

import pytest

from fedpit import config as config_mod
from fedpit.methods import METHODS
from fedpit.runs import RunDir
from fedpit.runtimes.local import prepare, run_experiment


@pytest.mark.parametrize("name", METHODS.names())
def test_method_runs_one_round(name, tmp_path, tiny_overrides):
    # Centralized would train its 10 epochs in this single round; one is enough for the invariants.
    config = config_mod.load(None, [*tiny_overrides, f"method.name='{name}'", "federation.rounds=1",
                                    "model.threads=1", "method.centralized.epochs=1"])
    exp = prepare(config)
    keys = set(exp.handle.lora_params)
    uploads = []
    run = RunDir.create(tmp_path / name, config)
    final = run_experiment(exp, run, observer=lambda r, u: uploads.append(u))
    assert uploads and set(final) == keys
    for upload in uploads:
        assert set(upload.tensors) in (keys, set())
        assert all(isinstance(v, float) for v in upload.metrics.values())
        for extra in upload.extras.values():
            assert set(extra) == keys
    assert [r["round"] for r in run.metrics() if r["kind"] == "round"] == [1]
