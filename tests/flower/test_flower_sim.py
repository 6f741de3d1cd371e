"""Flower's simulation engine runs the same experiment as the in-process simulator: same global
adapter, same run directory, nothing private in any message."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from fedpit import config as config_mod
from fedpit.runs import RunDir
from fedpit.runtimes.flower import server_app
from fedpit.runtimes.flower.simulation import run_simulation
from fedpit.runtimes.local import open_run, prepare, run_experiment

SIM = ["data.partition.num_clients=2", "federation.rounds=2"]


def _adapter(path):
    return load_file(path / "adapter" / "adapter_model.safetensors")


def test_flower_simulation_matches_the_in_process_simulator(tmp_path, tiny_overrides, monkeypatch):
    overrides = [*tiny_overrides, *SIM, "method.name='scaffold'"]  # server state and client state both travel
    config = config_mod.load(None, overrides)
    exp = prepare(config)
    local = open_run(exp, tmp_path / "local")
    run_experiment(exp, local)

    seen = []
    original = server_app.codec.decode_reply

    def inspect(content):
        seen.append(content)
        return original(content)

    monkeypatch.setattr(server_app.codec, "decode_reply", inspect)
    flower = run_simulation(config, tmp_path / "flower")
    assert RunDir(flower).read_status()["status"] == "complete"
    expected, got = _adapter(local.path), _adapter(flower)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    rounds = [r for r in RunDir(flower).metrics() if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2] and all(len(r["clients"]) == 2 for r in rounds)

    # every reply: adapter tensors, SCAFFOLD's delta, an identity and numbers; no text of any client
    assert len(seen) == 4
    private = [t for c in exp.federation.clients.values() for e in c for t in (e.instruction, e.output)]
    adapter_keys = set(exp.handle.lora_params)
    for content in seen:
        assert set(content.array_records) == {"upload", "extra.scaffold_delta_c"}
        assert set(content["upload"].keys()) == adapter_keys
        assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
        text = repr({k: dict(v) for k, v in content.config_records.items()})
        assert not any(p in text for p in private)
    assert list((flower / "clients").glob("*/state/round-*.safetensors")), "client state stays on the client side"


def test_bf16_transport_runs_and_records_wire_bytes(tmp_path, tiny_overrides):
    config = config_mod.load(None, [*tiny_overrides, *SIM, "federation.rounds=1", "method.name='fedavg'",
                                    "flower.transport='bf16'", "eval.final_sets=['medinstruct']",
                                    "eval.final_num_examples=2", "eval.max_new_tokens=4"])
    run = run_simulation(config, tmp_path / "bf16")
    # the server's final evaluation keeps its answers on Flower as in process
    assert [r["id"] for r in RunDir(run).load_answers("final")["medinstruct"]] == [
        e.id for e in prepare(config).federation.final_sets["medinstruct"]]
    sent = next(r for r in RunDir(run).metrics() if r["kind"] == "round")
    fp32_bytes = sum(t.numel() * 4 for t in _adapter(run).values())
    assert all(c["upload_bytes"] < fp32_bytes for c in sent["clients"].values())


def test_both_levels_of_dp_run_on_flower_with_the_budget_of_the_in_process_run(tmp_path, tiny_overrides, monkeypatch):
    """Record-level DP-SGD (on the ClientApps) and client-level DP (in the shared server loop) run on
    Flower's engine: each round spends exactly what the in-process run spends, and no reply carries a
    training loss."""
    config = config_mod.load(None, [*tiny_overrides, *SIM, "method.name='fedavg'", "privacy.dp.enabled=true",
                                    "privacy.dp.target_epsilon=4", "privacy.dp.delta=1e-3",
                                    "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=0.5",
                                    "privacy.client_dp.delta=0.1"])
    exp = prepare(config)
    local = open_run(exp, tmp_path / "local")
    run_experiment(exp, local)
    seen = []
    original = server_app.codec.decode_reply
    monkeypatch.setattr(server_app.codec, "decode_reply", lambda content: seen.append(content) or original(content))
    flower = run_simulation(config, tmp_path / "flower")

    def spent(path):
        return [({c: f["dp_epsilon"] for c, f in r["clients"].items()}, r["client_dp"]["epsilon"])
                for r in RunDir(path).metrics() if r["kind"] == "round"]

    assert spent(flower) == spent(local.path) and len(spent(flower)) == 2
    assert seen and all("dp_epsilon" in c["metrics"] and not any(k.startswith("train_loss") for k in c["metrics"])
                        for c in seen)
    assert list((flower / "clients").glob("*/dp-secret")) and (flower / "server-dp-secret").is_file()
