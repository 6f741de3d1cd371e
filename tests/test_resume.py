"""Never lose a run: checkpoints commit rounds, a run killed anywhere resumes to the same result,
corrupt checkpoints fall back to the previous good one, and resuming other code or data refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedpit import config as config_mod
from fedpit.errors import FedpitError
from fedpit.runs import RunDir
from fedpit.runtimes.local import open_run, prepare, run_experiment
from fedpit.runtimes.state import ClientStateStore
from fedpit.types import ClientState

RESUME_OVERRIDES = ["federation.rounds=3", "method.persistent_private=true", "data.partition.num_clients=2"]


def _cli(args: list[str], failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("FEDPIT_FAILPOINT", None)
    if failpoint:
        env["FEDPIT_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "fedpit.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _final_adapter(path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def resume_overrides(tiny_overrides):
    return [*tiny_overrides, *RESUME_OVERRIDES]


@pytest.fixture
def reference_run(tmp_path, resume_overrides):
    cfg = config_mod.load(None, resume_overrides)
    exp = prepare(cfg)
    run = open_run(exp, tmp_path / "reference")
    run_experiment(exp, run)
    return run


@pytest.mark.parametrize("failpoint", [
    "round_start:2",            # between rounds
    "generation_batch:3",       # mid self-generation
    "train_step:4",             # mid local training
    "after_client_update:2",    # one client done (its state saved), the other not
    "mid_metrics_write:3",      # a torn metrics line
    "mid_commit:2",             # checkpoint files written, manifest not
])
def test_killed_run_resumes_to_the_same_adapter(tmp_path, resume_overrides, reference_run, failpoint):
    out = tmp_path / "killed"
    (tmp_path / "empty.toml").write_text("")
    args = ["run", str(tmp_path / "empty.toml"), "--quiet", "--out", str(out)]
    args += [a for o in resume_overrides for a in ("--set", o)]
    killed = _cli(args, failpoint)
    assert killed.returncode == -9, f"the failpoint did not fire: {killed.stderr[-2000:]}"
    assert RunDir(out).read_status()["status"] == "running"
    resumed = _cli(["run", "--quiet", "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert RunDir(out).read_status()["status"] == "complete"
    expected, got = _final_adapter(reference_run.path), _final_adapter(out)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    rounds = [r["round"] for r in RunDir(out).metrics() if r["kind"] == "round"]
    assert rounds == [1, 2, 3], "every round is recorded exactly once"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, reference_run, caplog):
    run = reference_run
    assert run.committed_rounds() == [0, 1, 2, 3]
    latest = run.path / "checkpoints" / "global-round-003.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    restored = run.restore()
    assert restored is not None
    round_num, adapter, state = restored
    assert round_num == 2
    assert all(torch.equal(adapter[k], run.load_checkpoint(2)[k]) for k in adapter)
    assert state["num_clients"] == 2
    assert "unusable" in caplog.text
    assert max(r["round"] for r in run.metrics()) == 2, "metrics of the lost round are cut back"


def test_server_state_round_trips_through_a_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    state = {"num_clients": 4, "c": {"a.weight": torch.ones(2, 3)},
             "optimizer": {"m/a.weight": torch.full((2,), 0.5), "v/a.weight": torch.zeros(2)}, "empty": {}}
    run.commit(5, {"a.weight": torch.arange(6.0).reshape(2, 3)}, state)
    round_num, adapter, restored = run.restore()
    assert round_num == 5 and restored.keys() == state.keys() and restored["num_clients"] == 4
    assert torch.equal(restored["c"]["a.weight"], state["c"]["a.weight"])
    assert torch.equal(restored["optimizer"]["m/a.weight"], state["optimizer"]["m/a.weight"])


def test_client_state_is_versioned_by_round(tmp_path):
    store = ClientStateStore(tmp_path, keep=2)
    for r in (1, 2, 3):
        store.save("c0", r, ClientState(tensors={"private": {"w": torch.full((2,), float(r))}}, values={"r": r}))
    assert store.load("c0", 3).values == {"r": 2}, "round 3 starts from what round 2 left"
    assert store.load("c0", 4).tensors["private"]["w"][0] == 3
    assert store.load("c0", 1).values == {}, "round 1 starts empty"
    assert len(list((tmp_path / "c0" / "state").glob("*.safetensors"))) == 2, "old versions are pruned"


def test_resume_refuses_other_data(tmp_path, resume_overrides):
    cfg = config_mod.load(None, [*resume_overrides, "federation.rounds=1"])
    exp = prepare(cfg)
    open_run(exp, tmp_path / "run")
    data_file = next(o.split("=", 1)[1].strip("'") for o in resume_overrides if o.startswith("data.file="))
    with open(data_file, "a", encoding="utf-8") as handle:  # the data changed since the run started
        handle.write('\n{"instruction": "A new question?", "input": "", "output": "A new answer.", "qtype": "x"}')
    changed = prepare(config_mod.load(None, [*resume_overrides, "federation.rounds=1"]))
    with pytest.raises(FedpitError, match="data"):
        open_run(changed, tmp_path / "run", resume=True)


def test_resume_cli_errors(tmp_path):
    bad = _cli(["run", "--resume", str(tmp_path / "nowhere")])
    assert bad.returncode == 2 and "not a run directory" in bad.stderr
    both = _cli(["run", "configs/demo.toml", "--resume", str(tmp_path)])
    assert both.returncode == 2 and "--resume takes the config" in both.stderr


def test_run_and_client_folders_are_private_to_the_user(reference_run):
    assert (reference_run.path.stat().st_mode & 0o777) == 0o700
    for folder in [reference_run.path / "clients", *(reference_run.path / "clients").iterdir()]:
        assert (folder.stat().st_mode & 0o077) == 0, f"{folder} is readable by others"
    assert all((f.stat().st_mode & 0o077) == 0 for f in (reference_run.path / "checkpoints").glob("round-*.json"))


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ".hidden", ""])
def test_config_name_cannot_escape_the_runs_folder(name):
    with pytest.raises(FedpitError, match="name"):
        config_mod.load(None, [f"name='{name}'"])


def _failing_client(monkeypatch, exp, victim: str, error: Exception):
    original = type(exp.method).client_update

    def client_update(self, ctx, global_adapter):
        if ctx.client == victim and ctx.round == 2:
            raise error
        return original(self, ctx, global_adapter)

    monkeypatch.setattr(type(exp.method), "client_update", client_update)


def test_a_failing_client_is_named_and_the_run_stays_resumable(tmp_path, resume_overrides, monkeypatch):
    exp = prepare(config_mod.load(None, resume_overrides))
    victim = sorted(exp.federation.clients)[1]
    _failing_client(monkeypatch, exp, victim, torch.OutOfMemoryError("CPU out of memory"))
    run = open_run(exp, tmp_path / "run")
    with pytest.raises(FedpitError, match=rf"{victim}: OutOfMemoryError.*--resume"):
        run_experiment(exp, run)
    assert run.committed_rounds() == [0, 1], "the failed round is not committed, earlier ones are intact"
    monkeypatch.undo()
    resumed = prepare(config_mod.load(None, resume_overrides), handle=exp.handle)
    run_experiment(resumed, open_run(resumed, tmp_path / "run", resume=True))
    assert [r["round"] for r in run.metrics() if r["kind"] == "round"] == [1, 2, 3]


def test_a_failing_client_is_dropped_when_enough_others_reply(tmp_path, resume_overrides, monkeypatch):
    exp = prepare(config_mod.load(None, [*resume_overrides, "federation.min_replies=1"]))
    victim = sorted(exp.federation.clients)[0]
    _failing_client(monkeypatch, exp, victim, RuntimeError("disk on fire"))
    run = open_run(exp, tmp_path / "run")
    run_experiment(exp, run)
    second = next(r for r in run.metrics() if r["kind"] == "round" and r["round"] == 2)
    assert second["dropped"] == {victim: "RuntimeError: disk on fire"}
    assert victim not in second["clients"] and len(second["clients"]) == 1
