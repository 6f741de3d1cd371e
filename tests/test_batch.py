"""`fedpit compare` and `fedpit sweep` on the tiny model: one run per job, a table, resumable."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

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


def test_variants_are_rows_of_their_own(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "levers"
    sets = [a for o in [*tiny_overrides, "federation.rounds=1", "model.threads=1"] for a in ("--set", o)]
    assert main(["compare", "configs/demo.toml", *sets, "--methods", "fedavg", "--variant",
                 "pit-beta1:method.name='fedpit';method.fedpit.beta=1.0", "--page", "levers.md", "--quiet",
                 "--out", str(out)]) == 0
    assert "| pit-beta1 |" in (out / "levers.md").read_text()
    assert "beta = 1.0" in (out / "pit-beta1-seed0" / "config.toml").read_text()
    assert main(["compare", "configs/demo.toml", *sets, "--variant", "no-overrides", "--out", str(out)]) == 2
    assert "must look like LABEL:KEY=VALUE" in capsys.readouterr().err


def test_compare_rejects_unknown_method(tmp_path, tiny_overrides, capsys):
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    assert main(["compare", "configs/demo.toml", *sets, "--methods", "fedpit,fedmagic", "--out", str(tmp_path)]) == 2
    assert "unknown method 'fedmagic'" in capsys.readouterr().err


def test_compare_pairs_methods_with_confidence_intervals_and_judges(tmp_path, tiny_overrides, tiny_judge_server):
    """With [eval.judge] set, compare judges every run against the references and each method head to
    head against the reference method, through a real server; comparison.md holds each method's paired
    difference to the reference with its CI, and the Δ equals the per-example difference of the saved
    answers. A second invocation sends the judge nothing."""
    out = tmp_path / "cmp"
    overrides = [*tiny_overrides, "federation.rounds=1", "model.threads=1", "eval.final_sets=['medinstruct']",
                 "eval.final_num_examples=4", "eval.max_new_tokens=4", "eval.judge.model='judge'",
                 f"eval.judge.endpoint='{tiny_judge_server.url}'", "eval.judge.api_key_env=''",
                 "eval.judge.max_tokens=4"]
    argv = ["compare", "configs/demo.toml", *[a for o in overrides for a in ("--set", o)], "--methods",
            "fedpit,fedavg", "--seeds", "0,1", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    # 4 runs x 4 examples x 2 orders against the references, 2 fedpit runs x 4 x 2 head to head
    assert tiny_judge_server.counts()["chat_completions"] == 48
    assert (out / "fedpit-seed1" / "judge" / "final" / "medinstruct--vs-fedavg-seed1.jsonl").is_file()
    page = (out / "comparison.md").read_text()
    assert "## Against fedavg: paired differences with 95% CIs" in page and "differences_medinstruct.png" in page
    assert "fedpit 0 win / 0 tie / 0 lose / 8 invalid" in page  # unparsable replies are counted and shown
    assert "| fedpit | 0 | 0 | 0 | 8 | – | – |" in page  # head to head: 2 seeds x 4 examples, all invalid
    row = next(line for line in page.splitlines() if line.startswith("| fedpit |") and "[" in line)
    shown = float(re.search(r"\| ([+-]\d\.\d+) \[", row).group(1))

    def nll(run):
        return {json.loads(x)["id"]: json.loads(x)["nll"] for x in (out / run / "eval/final/medinstruct.jsonl").open()}

    ids = nll("fedavg-seed0")
    expected = np.mean([nll(f"fedpit-seed{s}")[i] - nll(f"fedavg-seed{s}")[i] for s in (0, 1) for i in ids])
    assert shown == pytest.approx(expected, abs=1e-3)

    assert main(argv) == 0  # everything complete and cached
    assert tiny_judge_server.counts()["chat_completions"] == 48
