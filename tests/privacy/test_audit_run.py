"""Leakage tracked during a run and measured afterwards with `fedpit attack`."""

from __future__ import annotations

from fedpit.cli import main
from fedpit.runs import RunDir

PRIVACY = ["privacy.enabled=true", "privacy.num_members=4", "privacy.num_nonmembers=6", "privacy.prefix_tokens=4",
           "privacy.max_new_tokens=6", "privacy.canary_candidates=20", "privacy.canary_repeats=3",
           "privacy.targets=['global','uploads','private']", "data.holdout_size=6", "model.threads=1",
           "data.fewshot.total=30"]


def test_run_tracks_leakage_and_attack_reruns_it(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    sets = [a for o in [*tiny_overrides, *PRIVACY, "federation.rounds=1"] for a in ("--set", o)]
    assert main(["run", "configs/demo.toml", *sets, "--quiet", "--out", str(out)]) == 0
    run = RunDir(out)
    records = [r for r in run.metrics() if r["kind"] == "privacy"]
    targets = {(r["round"], r["target"]) for r in records}
    assert {(1, "global"), (1, "upload"), (1, "private")} <= targets
    assert sum(1 for r in records if r["target"] == "upload") == 3
    figures = next(r["figures"] for r in records if r["target"] == "global" and r["round"] == 1)
    for key in ("memorization_rougeL", "extraction_exact_rate", "mia_loss_auc", "mia_ref_auc",
                "canary_exposure_sampled", "canary_exposure_extrapolated"):
        assert key in figures
    # canaries were planted in the first client only and never reach the evaluation sets
    assert len(list((out / "uploads" / "round-001").glob("*.safetensors"))) == 3
    assert main(["attack", str(out), "--target", "global", "uploads", "--attacks", "membership", "--quiet"]) == 0
    after = [r for r in run.metrics() if r.get("source") == "fedpit attack"]
    assert len(after) == 4 and all("mia_loss_auc" in r["figures"] for r in after)
    report = (out / "report.md").read_text()
    assert "Leakage" in report


def test_attack_without_uploads_is_a_clear_error(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    sets = [a for o in [*tiny_overrides, "federation.rounds=1"] for a in ("--set", o)]
    assert main(["run", "configs/demo.toml", *sets, "--quiet", "--out", str(out)]) == 0
    assert main(["attack", str(out), "--target", "uploads", "--quiet"]) == 2
    assert "kept no uploads" in capsys.readouterr().err


def test_canaries_are_planted_in_chosen_clients_only(tiny_overrides, data_dir):
    from fedpit import config as config_mod
    from fedpit.runtimes.local import prepare

    overrides = [o for o in tiny_overrides if not o.startswith("eval.sets")]
    config = config_mod.load(None, [*overrides, *PRIVACY, "privacy.canary_clients=2", "privacy.canary_repeats=5",
                                    "eval.sets=['medinstruct']", "eval.num_examples=3", f"data.dir='{data_dir}'"])
    exp = prepare(config)
    planted = {c: [e for e in examples if e.meta.get("canary")] for c, examples in exp.federation.clients.items()}
    assert [len(v) for _, v in sorted(planted.items())] == [5, 5, 0]
    assert {c.client for c in exp.canaries} == {"client-00", "client-01"}
    elsewhere = [e for s in exp.federation.eval_sets.values() for e in s] + exp.federation.holdout
    assert not any(e.meta.get("canary") or "patient number" in e.instruction for e in elsewhere)
