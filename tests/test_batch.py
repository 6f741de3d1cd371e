"""`fedpit compare` and `fedpit sweep` on the tiny model: one run per job, a table, resumable."""

from __future__ import annotations

import logging

from fedpit.cli import main


def test_compare_writes_table_and_resumes(tmp_path, tiny_overrides, caplog):
    caplog.set_level(logging.INFO, logger="fedpit")
    out = tmp_path / "cmp"
    sets = [a for o in [*tiny_overrides, "federation.rounds=1", "model.threads=1"] for a in ("--set", o)]
    argv = ["compare", "configs/demo.toml", *sets, "--methods", "fedpit,fedavg", "--seeds", "0,1", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    page = (out / "comparison.md").read_text()
    assert "| fedpit |" in page and "| fedavg |" in page
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "fedavg-seed0", "fedavg-seed1", "fedpit-seed0", "fedpit-seed1"]
    stamp = (out / "fedpit-seed0" / "metrics.jsonl").stat().st_mtime_ns
    (out / "fedavg-seed1" / "run.json").write_text('{"status": "running"}')  # as if interrupted
    caplog.clear()
    assert main(argv) == 0
    assert "fedpit-seed0: complete, skipped" in caplog.text and "fedavg-seed1: running" in caplog.text
    assert (out / "fedpit-seed0" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_sweep_over_beta(tmp_path, tiny_overrides):
    out = tmp_path / "sweep"
    sets = [a for o in [*tiny_overrides, "federation.rounds=1", "model.threads=1"] for a in ("--set", o)]
    assert main(["sweep", "configs/demo.toml", *sets, "--param", "method.beta", "--values", "0,1", "--quiet",
                 "--out", str(out)]) == 0
    page = (out / "sweep.md").read_text()
    assert "| beta=0 |" in page and "| beta=1 |" in page


def test_compare_rejects_unknown_method(tmp_path, tiny_overrides, capsys):
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    assert main(["compare", "configs/demo.toml", *sets, "--methods", "fedpit,fedmagic", "--out", str(tmp_path)]) == 2
    assert "unknown method 'fedmagic'" in capsys.readouterr().err
