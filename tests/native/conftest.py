"""The native kernels' tests need the C compiler that fedpit itself can do without (it then keeps torch's
operations: test_build.py)."""

from __future__ import annotations

import pytest

from fedpit.native.build import build
from fedpit.native.kernels import DecodeKernels


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> DecodeKernels:
    return DecodeKernels(build(tmp_path_factory.mktemp("cache")))  # without a compiler: 'no C compiler'
