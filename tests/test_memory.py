"""After `keep_freed_memory`, a large tensor allocated again reuses the freed memory: no page faults.

The page-fault count is the mechanism itself (what the kernel does for a fresh mmap), read from
getrusage, so the test does not depend on timing."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from fedpit.memory import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting")


def faults_to_fill(mib: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(mib * 2**20 // 4)  # fills every page
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del tensor
    return after - before


def test_a_second_large_tensor_reuses_the_first_ones_pages():
    assert keep_freed_memory() and keep_freed_memory()  # on, and idempotent
    faults_to_fill(256)  # the heap grows once
    pages = 256 * 2**20 // resource.getpagesize()
    assert faults_to_fill(256) < pages // 20  # glibc's default: a fresh mmap, one fault per page
