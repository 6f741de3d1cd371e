"""Building the native kernels (native/build.py): once per cache, never half-written; without a working compiler,
`load` gives None and says why and what to do."""

from __future__ import annotations

import logging

import pytest

from fedpit.native import build as build_module
from fedpit.native.build import build
from fedpit.native.kernels import load


def test_built_once_per_cache_and_never_half_written(tmp_path, monkeypatch):
    first = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    compiled = []
    real_run = build_module.subprocess.run
    monkeypatch.setattr(build_module.subprocess, "run",
                        lambda command, **kw: compiled.append(command) or real_run(command, **kw))
    assert build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert all("--version" in command for command in compiled)  # asked the compiler who it is, built nothing
    assert [p.name for p in (tmp_path / "native").iterdir()] == [first.name]  # no temporary file left


def test_sources_from_another_folder_build_their_own_library(tmp_path):
    """What benchmarks/kernels_ab.py relies on: a copy of the sources builds the library of the sources it holds
    (the same key as fedpit's own while it is the same), and a changed copy builds another."""
    copy = tmp_path / "src"
    copy.mkdir()
    for path in (*build_module.SOURCES, *build_module.HEADERS):
        (copy / path.name).write_bytes(path.read_bytes())
    ours = build(tmp_path / "cache")
    assert build(tmp_path / "cache", source_dir=copy) == ours
    changed = copy / build_module.SOURCES[0].name
    changed.write_text(changed.read_text() + "\n/* another revision */\n")
    other = build(tmp_path / "cache", source_dir=copy)
    assert other != ours and other.is_file()


@pytest.mark.parametrize("compiler,reason", [("/nonexistent/cc", "no C compiler"), ("false", "failed to build")])
def test_without_a_working_compiler_it_is_none_and_says_why(tmp_path, monkeypatch, caplog, compiler, reason):
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING, logger="fedpit.native.kernels"):
        assert load(tmp_path) is None
    assert reason in caplog.text and "model.native_decode = false" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
