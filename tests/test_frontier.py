"""`fedpit frontier` without a model: the Pareto computation by hand, frontier.md on run directories
made here (answers, audit and DP records as a run writes them), and the command line's checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedpit import config as config_mod
from fedpit.cli import main
from fedpit.frontier import MEASURES, ROWS, pareto_front, write_frontier
from fedpit.methods import build_method

NAN = math.nan
IDS = [f"q{i:02d}" for i in range(12)]
BASE = [2.0 + 0.05 * i for i in range(12)]  # the reference's per-example NLL

# label -> (per-example NLL offset to the reference, global canary, global memorisation, global MIA,
#           upload canary, upload MIA); NaN: the figure was not measured
ROW_SPEC = {
    "fedavg": ([0.0] * 12, 19.0, 0.25, 0.72, 19.5, 0.86),
    "fedpit-beta0.5": ([0.10 + (0.01 if i % 2 else -0.01) for i in range(12)], 8.0, 0.20, 0.67, 19.0, 0.86),
    "fedavg-dpsgd-eps4": ([0.20 + 0.004 * i for i in range(12)], 10.0, 0.15, 0.60, 5.0, 0.55),
    "fedpit-dpsgd-eps4": ([0.15 + (0.02 if i % 3 else -0.02) for i in range(12)], 9.0, 0.22, 0.70, 19.0, 0.86),
    "dp-fedavg": ([0.05 if i % 2 else -0.06 for i in range(12)], NAN, 0.24, 0.72, NAN, 0.90),
}
# worked out by hand from ROW_SPEC (x: leakage, y: mean Δ NLL; dp-fedavg's Δ is -0.005 < fedavg's 0)
EXPECTED_FRONT = {
    "global_canary": {"fedavg", "fedpit-beta0.5"},
    "global_memorization": {"dp-fedavg", "fedpit-beta0.5", "fedavg-dpsgd-eps4"},
    "global_mia": {"dp-fedavg", "fedpit-beta0.5", "fedavg-dpsgd-eps4"},
    "upload_canary": {"fedavg", "fedpit-beta0.5", "fedavg-dpsgd-eps4"},
    "upload_mia": {"fedavg", "fedavg-dpsgd-eps4", "dp-fedavg"},
}
SEEDS = (0, 1)


@pytest.mark.parametrize("points, front", [
    ({"a": (1.0, 1.0)}, {"a"}),
    ({"a": (1.0, 1.0), "b": (2.0, 2.0)}, {"a"}),
    ({"a": (1.0, 1.0), "b": (1.0, 1.0)}, {"a", "b"}),  # identical points do not dominate each other
    ({"a": (1.0, 2.0), "b": (1.0, 1.0)}, {"b"}),  # equal leakage, better utility
    ({"a": (2.0, 1.0), "b": (1.0, 1.0)}, {"b"}),  # equal utility, less leakage
    ({"a": (1.0, 3.0), "b": (2.0, 2.0), "c": (3.0, 1.0), "d": (3.0, 3.0)}, {"a", "b", "c"}),
    ({"a": (NAN, 0.0), "b": (1.0, 1.0), "c": (0.5, NAN)}, {"b"}),  # NaNs neither join nor dominate
    ({}, set()),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def _make_run(path: Path, label: str, seed: int) -> None:
    """A run directory as `fedpit run` leaves it: config, metrics.jsonl (rounds, audits), final answers."""
    offsets, *leak = ROW_SPEC[label]
    gc, gm, gmia, uc, umia = leak
    spread = -0.01 if seed == 0 else 0.01  # seeds differ; the mean over the two is the spec
    config = config_mod.load(None, [*ROWS[label], f"seed={seed}"])
    path.mkdir(parents=True)
    (path / "config.toml").write_text(config_mod.dumps(config))
    (path / "run.json").write_text(json.dumps({"status": "complete"}))
    records = []
    for round_num in (1, 2):
        clients = {f"client-0{k}": {"num_examples": 16, "upload_bytes": 1, "seconds": {}} for k in range(3)}
        if config.privacy.dp.enabled:
            for k, eps in enumerate((3.9, 3.95 + 0.02 * seed if round_num == 2 else 2.0, 3.8)):
                clients[f"client-0{k}"]["dp_epsilon"] = eps
        rec = {"kind": "round", "round": round_num, "clients": clients, "sampled": list(clients), "upload_bytes": 1,
               "seconds": {"round": 1.0, "aggregate": 0.0}, "learning_rate": 0.001, "method": config.method.name}
        if config.privacy.client_dp.enabled:
            rec["client_dp"] = {"epsilon": 1.0 * round_num + 0.1 * seed}
        records.append(rec)

    def audit(round_num, target, client, figures, **extra):
        figures = {k: v for k, v in figures.items() if not math.isnan(v)}
        records.append({"kind": "privacy", "round": round_num, "target": target, "client": client,
                        "figures": figures, "method": config.method.name, **extra})

    audit(0, "global", None, {"canary_exposure_extrapolated": 1.0, "memorization_rougeL": 0.1, "mia_ref_auc": 0.5})
    audit(2, "global", None, {"canary_exposure_extrapolated": gc + spread, "memorization_rougeL": gm + spread,
                              "mia_ref_auc": gmia + spread})
    for k in range(3):
        canary = {"canary_exposure_extrapolated": uc + spread} if k == 0 else {}  # the canary is in client-00
        audit(2, "upload", f"client-0{k}", {**canary, "mia_ref_auc": umia + spread + 0.02 * (k - 1)})
    audit(3, "global", None, {"canary_exposure_extrapolated": 0.0, "memorization_rougeL": 0.0, "mia_ref_auc": 0.0},
          source="fedpit attack")  # an attack afterwards: not the run's own audit
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, scale in (("medquad", 1.0), ("medinstruct", 0.5)):
        folder = path / "eval" / "final"
        folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"id": i, "nll": b + 0.03 * seed + scale * o, "rougeL": 0.2})
                 for i, b, o in zip(IDS, BASE, offsets)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def _fabricate(root: Path) -> dict[str, list[Path]]:
    groups = {}
    for label in ROW_SPEC:
        groups[label] = [root / f"{label}-seed{seed}" for seed in SEEDS]
        for seed, path in zip(SEEDS, groups[label]):
            _make_run(path, label, seed)
    return groups


def _table(page: str) -> dict[str, dict[str, str]]:
    lines = [line for line in page.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_frontier_page(tmp_path):
    groups = _fabricate(tmp_path)
    page = write_frontier(tmp_path, groups, "fedavg").read_text()
    table = _table(page)
    assert list(table) == list(ROW_SPEC)
    for label, (offsets, *_rest) in ROW_SPEC.items():
        if label == "fedavg":
            continue
        for name, scale in (("medquad", 1.0), ("medinstruct", 0.5)):
            mean = scale * sum(offsets) / len(offsets)  # the per-example mean difference written above
            shown = float(table[label][f"Δ {name} NLL"].strip("*").split(" [")[0])
            assert shown == pytest.approx(mean, abs=5.1e-4), (label, name)  # shown to 3 digits
    assert table["fedpit-beta0.5"]["Δ medquad NLL"].startswith("**+0.100 [")  # significant: bold
    assert table["dp-fedavg"]["Δ medquad NLL"].endswith(" n.s.")  # its CI includes 0
    reference_nll = sum(BASE) / len(BASE) + 0.03 * 0.5  # mean over both seeds
    assert table["fedavg"]["Δ medquad NLL"] == f"{reference_nll:.3f} (reference)"
    for label, expected in {label: {m for m, front in EXPECTED_FRONT.items() if label in front}
                            for label in ROW_SPEC}.items():
        cell = table[label]["on the frontier for"]
        assert set(cell.split(", ")) - {"–"} == expected, label
    assert table["fedavg-dpsgd-eps4"]["record ε"] == "3.97 (δ 1e-05)"  # the largest over clients and seeds
    assert table["dp-fedavg"]["client ε"] == "2.10 (δ 0.001)"  # after the last round, largest over seeds
    assert table["fedavg"]["record ε"] == table["fedavg"]["client ε"] == "–"
    assert table["fedavg-dpsgd-eps4"]["covers"] == "uploads + global"
    assert table["fedpit-dpsgd-eps4"]["covers"] == "W_l only (no guarantee on upload/global)"
    assert table["dp-fedavg"]["covers"] == "global model, client-level"
    assert table["fedavg"]["covers"] == "none"
    from fedpit.report import COVERS_CLIENT, COVERS_RECORD, COVERS_RECORD_SYNTHETIC

    for text in (COVERS_RECORD, COVERS_RECORD_SYNTHETIC, COVERS_CLIENT):
        assert page.count(text) == 1
    # leakage: the last round the run attacked, uploads the mean over clients, mean over seeds
    assert table["fedpit-beta0.5"]["canary exposure (bits) global / upload"] == "8.0 / 19.0"
    assert table["fedavg"]["MIA AUC (calibrated) global / upload"] == "0.720 / 0.860"
    assert table["dp-fedavg"]["canary exposure (bits) global / upload"] == "– / –"
    assert "not significant (CI includes 0): dp-fedavg." in page and "on the means" in page
    for measure in MEASURES:
        assert (tmp_path / f"pareto_{measure}.png").stat().st_size > 1000
        assert f"![pareto_{measure}.png](pareto_{measure}.png)" in page


def test_frontier_command_on_complete_runs(tmp_path, capsys):
    """Every run already complete: the command skips them all (no model is loaded) and writes both pages."""
    out = tmp_path / "frontier"
    _fabricate(out)
    code = main(["frontier", "configs/frontier.toml", "--rows", ",".join(ROW_SPEC), "--seeds", "0,1",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "| fedpit-beta0.5 |" in (out / "comparison.md").read_text()
    table = _table((out / "frontier.md").read_text())
    assert set(table["fedavg"]["on the frontier for"].split(", ")) == {"global_canary", "upload_canary",
                                                                       "upload_mia"}


def test_frontier_help_parses(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["frontier", "--help"])
    assert exited.value.code == 0
    assert "--rows" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--rows", "nope"], "unknown row(s) nope; the rows are: " + ", ".join(ROWS)),
    (["--rows", "fedpit-beta0.5"], "--reference 'fedavg' is not one of the compared rows: fedpit-beta0.5"),
])
def test_bad_rows_fail_before_anything_runs(tmp_path, capsys, monkeypatch, argv, message):
    import fedpit.runtimes.batch as batch

    def no_jobs(*args, **kwargs):
        raise AssertionError("jobs started")

    monkeypatch.setattr(batch, "run_jobs", no_jobs)
    out = tmp_path / "frontier"
    assert main(["frontier", "configs/frontier.toml", *argv, "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_every_row_is_a_valid_config_of_the_experiment():
    assert list(ROWS) == ["fedavg", "fedavg-dpsgd-eps1", "fedavg-dpsgd-eps4", "fedavg-dpsgd-eps16", "dp-fedavg",
                          "fedpit-beta0.25", "fedpit-beta0.5", "fedpit-beta0.75", "fedpit-dpsgd-eps4",
                          "fedpit-dpsgd-eps4-public", "fedavg-fewer-steps"]
    for label, overrides in ROWS.items():
        config = config_mod.load("configs/frontier.toml", overrides)
        build_method(config)
        assert config.method.name == ("fedpit" if label.startswith("fedpit") else "fedavg"), label
    dp = config_mod.load("configs/frontier.toml", ROWS["dp-fedavg"]).privacy.client_dp
    assert (dp.enabled, dp.noise_multiplier, dp.clip_norm, dp.delta) == (True, 1.0, 0.05, 1e-2)
    eps = config_mod.load("configs/frontier.toml", ROWS["fedavg-dpsgd-eps16"]).privacy.dp
    assert (eps.enabled, eps.target_epsilon) == (True, 16.0)
    assert config_mod.load("configs/frontier.toml", ROWS["fedpit-dpsgd-eps4-public"]).synth.demonstrations == "public"


def test_compare_shares_the_batch_helper(tmp_path, capsys):
    """`fedpit compare` runs its rows through the same helper: complete runs skipped, its page written."""
    out = tmp_path / "cmp"
    _fabricate(out)
    variants = [a for label in ROW_SPEC for a in ("--variant", f"{label}:" + ";".join(ROWS[label]))]
    code = main(["compare", "configs/frontier.toml", *variants, "--seeds", "0,1", "--reference", "fedavg",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    page = (out / "comparison.md").read_text()
    assert "## Against fedavg" in page and "| fedpit-beta0.5 |" in page
    assert not (out / "frontier.md").exists()
