"""After `keep_freed_memory`, a large tensor allocated after a larger one was freed reuses its pages.

The page-fault count is the mechanism itself (what the kernel does for a fresh mmap), read from
getrusage, so the test does not depend on timing. It runs in a fresh process: glibc moves a thread
whose allocation once failed (anything in a long test session may have tried a huge one) to an
arena of its own, where blocks this large are mapped anew every time whatever mallopt says."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from fedpit import memory
from fedpit.errors import ConfigError

SECOND_FILL_FAULTS = """
import resource, torch
from fedpit.memory import keep_freed_memory

def faults_to_fill(mib):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(mib * 2**20 // 4)  # touches every page
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del tensor
    return after - before

on = keep_freed_memory() and keep_freed_memory()  # idempotent
faults_to_fill(256)  # the heap grows once
print(on, faults_to_fill(192))  # fits in the freed block (the same size may not: torch's 64-byte alignment asks more)
"""


def _second_fill(keep: str) -> tuple[bool, int]:
    env = {**os.environ, "FEDPIT_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", SECOND_FILL_FAULTS], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


def pages_of(mib: int) -> int:
    return mib * 2**20 // resource.getpagesize()


def test_a_smaller_second_tensor_reuses_the_first_ones_pages():
    on, faults = _second_fill("1")
    assert on and faults < pages_of(192) // 20


def test_opting_out_keeps_glibcs_default_a_fresh_mapping_each_time():
    on, faults = _second_fill("0")
    assert not on and faults > pages_of(192) // 2



def test_other_c_libraries_and_a_bad_setting(monkeypatch):
    """Off without glibc (mallopt's parameters are glibc's); a value other than 0 or 1 is refused by name."""
    monkeypatch.setattr(memory, "_applied", False)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called on another C library"))
    assert memory.keep_freed_memory() is False
    monkeypatch.setenv("FEDPIT_KEEP_FREED_MEMORY", "false")
    with pytest.raises(ConfigError, match="FEDPIT_KEEP_FREED_MEMORY='false': set it to 1 .* or 0"):
        memory.keep_freed_memory()
