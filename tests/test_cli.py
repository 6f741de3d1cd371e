"""Bad input at the command line: one clear error line, exit status 2, no run directory left."""

from __future__ import annotations

import pytest

from fedpit.cli import main


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--set", "federation.roundz=2"], "unknown config key 'federation.roundz'"),
    (["--set", "method.name='fedmagic'"], "unknown method 'fedmagic'"),
    (["--set", "model.name='/nonexistent/model-folder'"], "could not load model"),
    (["--set", "data.dir='/nonexistent/data'"], "/nonexistent/data"),
    (["--set", "model.quantization='3bit'"], "choose one of: none, 8bit, 4bit"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, tiny_overrides, extra, message):
    out = tmp_path / "run-out"
    sets = [a for o in tiny_overrides if not o.startswith("eval.sets") for a in ("--set", o)]
    code, err = _run(capsys, ["run", "configs/demo.toml", *sets, "--set", "eval.sets=['medquad']", *extra,
                              "--out", str(out)])
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_client_with_too_few_examples(tmp_path, capsys, tiny_overrides):
    out = tmp_path / "run-out"
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    code, err = _run(capsys, ["run", "configs/demo.toml", *sets, "--set", "data.partition.min_examples=1",
                              "--set", "data.partition.num_clients=12", "--set", "synth.num_response_demos=3",
                              "--out", str(out)])
    assert code == 2 and "fewer than synth.num_response_demos=3" in err
    assert not out.exists()


def test_empty_data_file(tmp_path, capsys, tiny_overrides):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    code, err = _run(capsys, ["run", "configs/demo.toml", *sets, "--set", f"data.file='{empty}'",
                              "--out", str(tmp_path / "o")])
    assert code == 2 and "empty.jsonl" in err


def test_methods_lists_registered(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fedpit" in out and "fedavg" in out


def test_run_and_report(tmp_path, capsys, tiny_overrides):
    out = tmp_path / "run"
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    assert main(["run", "configs/demo.toml", *sets, "--set", "federation.rounds=1", "--quiet", "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "train_loss.png").is_file()
    assert main(["report", str(out)]) == 0


def test_flower_runtime_refuses_what_it_cannot_run(tmp_path, capsys):
    from fedpit.cli import main

    for extra, reason in (("privacy.enabled=true", "privacy audit"), ("method.name='centralized'", "federate")):
        code = main(["run", "configs/demo.toml", "--runtime", "flower-sim", "--set", extra,
                     "--out", str(tmp_path / "run")])
        assert code == 2 and reason in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_quantization_without_a_gpu_names_the_fix(tmp_path, capsys, tiny_overrides, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run-out"
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    code, err = _run(capsys, ["run", "configs/demo.toml", *sets, "--set", "model.quantization='4bit'",
                              "--out", str(out)])
    assert code == 2 and "needs a CUDA GPU" in err and "model.quantization='none'" in err
    assert not out.exists()
