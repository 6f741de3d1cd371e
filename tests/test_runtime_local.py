"""The in-process simulator end to end on the tiny model: run directory, privacy of replies, seeds."""

from __future__ import annotations

import json

import pytest
import torch

from fedpit import config as config_mod
from fedpit.runs import RunDir
from fedpit.runtimes.local import open_run, prepare, run_experiment, sample_clients


def _run(tmp_path, overrides, name="run"):
    cfg = config_mod.load(None, overrides)
    exp = prepare(cfg)
    run = RunDir.create(tmp_path / name, cfg)
    uploads = []
    final = run_experiment(exp, run, observer=lambda r, u: uploads.append((r, u)))
    return exp, run, final, uploads


def test_fedpit_run_writes_run_directory(tmp_path, tiny_overrides):
    exp, run, final, uploads = _run(tmp_path, tiny_overrides)
    records = run.metrics()
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    client_metrics = next(iter(rounds[0]["clients"].values()))
    for key in ("train_loss_private", "synthetic_generated", "synthetic_kept", "upload_bytes", "seconds"):
        assert key in client_metrics
    assert set(client_metrics["seconds"]) >= {"generation", "train_private", "mixing"}
    assert (run.path / "config.toml").is_file()
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()
    assert (run.path / "checkpoints" / "global-round-002.safetensors").is_file()
    saved = run.load_checkpoint(2)
    assert all(torch.equal(saved[k], final[k]) for k in final)
    synthetic = list((run.path / "clients").glob("*/synthetic/round-001.jsonl"))
    assert synthetic, "synthetic samples are kept per client"
    sample = json.loads(synthetic[0].read_text().splitlines()[0])
    assert {"instruction", "output", "round", "client", "instruction_demo_ids", "ifs", "selected"} <= set(sample)


def test_no_reply_contains_private_data(tmp_path, tiny_overrides):
    """Inspect every upload of a run: tensors of the adapter only, numbers only, no private text."""
    exp, run, _final, uploads = _run(tmp_path, tiny_overrides)
    private_texts = [e.output for c in exp.federation.clients.values() for e in c]
    private_texts += [e.instruction for c in exp.federation.clients.values() for e in c]
    synthetic_texts = []
    for file in (run.path / "clients").glob("*/synthetic/*.jsonl"):
        for line in file.read_text().splitlines():
            s = json.loads(line)
            synthetic_texts += [s["instruction"], s["output"]]
    assert len(uploads) == 6
    adapter_keys = set(exp.handle.lora_params)
    for _round, upload in uploads:
        assert set(upload.tensors) == adapter_keys
        assert all(isinstance(v, float) for v in upload.metrics.values())
        serialised = json.dumps({"client": upload.client, "n": upload.num_examples, "m": upload.metrics})
        for text in private_texts + synthetic_texts:
            assert text not in serialised
        assert upload.num_examples == len(exp.federation.clients[upload.client])


def test_same_seed_same_global_adapter(tmp_path, tiny_overrides):
    _, _, first, _ = _run(tmp_path, tiny_overrides, "a")
    _, _, second, _ = _run(tmp_path, tiny_overrides, "b")
    assert all(torch.equal(first[k], second[k]) for k in first)
    _, _, other, _ = _run(tmp_path, [*tiny_overrides, "seed=1"], "c")
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_client_sampling_is_seeded_and_sized():
    clients = [f"c{i}" for i in range(10)]
    first = sample_clients(clients, 2, seed=0, round_num=3)
    assert len(first) == 2 and first == sample_clients(clients, 2, seed=0, round_num=3)
    assert sample_clients(clients, 0, seed=0, round_num=1) == clients
    draws = {tuple(sample_clients(clients, 2, seed=0, round_num=r)) for r in range(1, 20)}
    assert len(draws) > 1


def test_persistent_private_adapters_are_evaluated_per_client(tmp_path, tiny_overrides, data_dir):
    overrides = [o for o in tiny_overrides if not o.startswith("eval.sets")]
    overrides += ["method.persistent_private=true", "federation.rounds=1", "eval.sets=['medinstruct']",
                  "eval.num_examples=2", "eval.max_new_tokens=4", "eval.at_start=false", f"data.dir='{data_dir}'"]
    exp, run, _final, _uploads = _run(tmp_path, overrides)
    personal = [r for r in run.metrics() if r["kind"] == "eval" and r["target"] == "personal"]
    assert sorted(r["client"] for r in personal) == sorted(exp.federation.clients)
    assert all("medinstruct" in r["results"] for r in personal)


def test_final_evaluation_keeps_every_answer(tmp_path, tiny_overrides):
    """The final global model is evaluated on the whole (here: capped) held-out sets, the per-round
    curve on their prefixes, and every answer lands under eval/ beside its per-example figures."""
    cfg = config_mod.load("configs/demo.toml", [*tiny_overrides, "federation.rounds=1", "eval.sets=['medinstruct']",
                                                "eval.num_examples=2", "eval.final_sets=['medinstruct','pubmedqa']",
                                                "eval.final_num_examples=3", "eval.max_new_tokens=4"])
    exp = prepare(cfg)
    run = open_run(exp, tmp_path / "run")
    run_experiment(exp, run)
    final = RunDir(run.path).load_answers("final")
    assert sorted(final) == ["medinstruct", "pubmedqa"] and all(len(v) == 3 for v in final.values())
    for record in final["pubmedqa"]:
        assert {"id", "instruction", "input", "reference", "answer", "nll", "rougeL", "decision",
                "correct"} <= set(record)
    per_round = RunDir(run.path).load_answers("round-001")["medinstruct"]
    assert [r["id"] for r in per_round] == [r["id"] for r in final["medinstruct"][:2]]  # a prefix of the final

    evals = [r for r in run.metrics() if r["kind"] == "eval"]
    assert [(e["round"], e["stage"]) for e in evals] == [(0, "round"), (1, "round"), (1, "final")]
    summary = evals[-1]["results"]["pubmedqa"]
    assert summary["n"] == 3 and summary["nll"] == pytest.approx(sum(r["nll"] for r in final["pubmedqa"]) / 3)


def test_diagnose_measures_the_synthetic_data_a_run_kept(tmp_path, tiny_overrides, capsys):
    from fedpit.cli import main

    out = tmp_path / "run"
    assert main(["run", "configs/demo.toml", *[a for o in tiny_overrides for a in ("--set", o)], "--quiet",
                 "--out", str(out)]) == 0
    assert main(["diagnose", str(out), "--quiet"]) == 0
    figures = json.loads((out / "synthetic_quality.json").read_text())
    kept = [json.loads(line) for f in out.glob("clients/*/synthetic/*.jsonl") for line in f.read_text().splitlines()]
    assert figures["samples_passed"] == len(kept)
    assert figures["samples_kept"] == sum(s["selected"] for s in kept) > 0
    assert figures["base_nll_private"]["n"] == 36 and figures["base_nll_private"]["mean"] > 0
    assert 0 < figures["pass_rate"] <= 1 and "base_nll" in capsys.readouterr().err
    assert main(["run", "configs/demo.toml", *[a for o in tiny_overrides for a in ("--set", o)],
                 "--set", "method.name='fedavg'", "--quiet", "--out", str(tmp_path / "avg")]) == 0
    assert main(["diagnose", str(tmp_path / "avg")]) == 2
    assert "kept no synthetic samples" in capsys.readouterr().err
