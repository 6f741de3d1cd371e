"""A decode step's attention over bf16 key/value caches on a CPU, from C compiled at first use.

Why: in a bf16 decode step of SmolLM2 (8 rows, ~300 tokens of context, 2 cores) torch's SDPA took
about 285 µs a layer, a quarter of the step, for a computation that reads under 1 MB. Its CPU kernel
runs one small matrix product per (row, head) pair through a general bf16 GEMM, whose per-call cost is
most of the time. `decode_attention.c` takes each (row, key/value head) in one pass: the query heads
that share a key/value head together, fp32 arithmetic, keys four at a time: about 115 µs for that layer,
270 against 640 µs at 16 rows and 380 tokens (`python benchmarks/decode_profile.py` shows the step).
Its output is not bitwise SDPA's (the sums run in another order); it is as close to an fp64 reference
as SDPA's (tested).

No library we can depend on offers this for torch 2.13 on a CPU: torch.compile of the same
computation was slower than SDPA, and the CPU extensions that ship such kernels are built for other
torch versions. torch's own `cpp_extension.load_inline` would build it against torch's headers (tens of
seconds on 2 cores, and ninja); the kernel needs none of them, so it is plain C loaded with ctypes, built in
under a second. The source ships with fedpit and the system C compiler (`$CC`, else `cc`) builds
it once per machine into `<cache>/native/` (`model.cache_dir`, `$FEDPIT_CACHE`, or ~/.cache/fedpit),
for the machine's own vector instructions (`-march=native`; the file name carries a hash of the source,
the compiler, the flags and the CPU's features, so a shared cache never serves a library built for
another CPU). Without a compiler, or where the build or the load fails, `load` returns None, logs why
once, and the decode step keeps the model's own attention function.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
# -fassociative-math lets the compiler vectorise the sums (with the two flags it requires); -ffast-math is
# avoided on purpose: linked into a shared library it switches the whole process to flush-to-zero.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-fPIC", "-shared")
MAX_DIM, MAX_GROUP = 256, 16  # decode_attention.c's buffers
BUILD_SECONDS = 120

_loaded: dict[Path, DecodeAttention | None] = {}


class DecodeAttention:
    """softmax(q·Kᵀ·scale, masked)·V for one new token a row, the query heads grouped over their key/value head."""

    def __init__(self, path: Path) -> None:
        """The kernel in the library `build` wrote at `path`."""
        self.path = path
        self._function = ctypes.CDLL(str(path)).decode_attention
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 12 + [ctypes.c_float]

    @staticmethod
    def supports(head_dim: int, group: int, dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and 1 <= head_dim <= MAX_DIM and 1 <= group <= MAX_GROUP

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attended: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """query [rows, heads, 1, dim]; key, value [rows, kv_heads, keys, dim] (views of a cache are fine:
        only the last dimension must be contiguous); attended [rows, keys] bool. Returns [rows, heads, dim]."""
        rows, heads, length, dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        if length != 1 or heads % kv_heads or not self.supports(dim, heads // kv_heads, query.dtype):
            raise ValueError(f"decode attention takes one bf16 query a row with head dimension <= {MAX_DIM}; got "
                             f"query {tuple(query.shape)} {query.dtype} over {kv_heads} key/value heads")
        if key.dtype != query.dtype or value.dtype != query.dtype or key.stride(-1) != 1 or value.stride(-1) != 1:
            raise ValueError("keys and values must be bf16 with a contiguous last dimension")
        if attended.dtype != torch.bool or tuple(attended.shape) != (rows, keys) or attended.stride(-1) != 1:
            raise ValueError(f"attended must be a bool [rows, keys] = [{rows}, {keys}] mask, got "
                             f"{attended.dtype} {tuple(attended.shape)}")
        query = query.contiguous()
        out = torch.empty((rows, heads, dim), dtype=query.dtype)
        status = self._function(query.data_ptr(), key.data_ptr(), value.data_ptr(), attended.data_ptr(),
                                out.data_ptr(), rows, kv_heads, heads // kv_heads, keys, dim,
                                *key.stride()[:3], *value.stride()[:3], attended.stride(0), scale)
        if status != 0:
            raise MemoryError("decode attention could not allocate its score buffer")
        return out


def load(cache: Path) -> DecodeAttention | None:
    """The kernel, built into `cache`/native on first use in this process, or None (the reason logged once)."""
    cache = Path(cache)
    if cache not in _loaded:
        try:
            _loaded[cache] = DecodeAttention(build(cache))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("the native decode attention is not available (%s); decoding uses the model's attention "
                        "function. Install a C compiler with OpenMP (gcc) or set $CC to one, or set "
                        "model.native_decode_attention = false to stop trying.", exc)
            _loaded[cache] = None
    return _loaded[cache]


def build(cache: Path) -> Path:
    """The compiled library in `cache`/native, compiled now if no build for this source, compiler and CPU is there."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler: '{' '.join(compiler) or '$CC'}' was not found")
    directory = cache / "native"
    target = directory / f"decode_attention-{_build_key(compiler)}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a concurrent process never loads half a library.
    handle, partial = tempfile.mkstemp(dir=directory, prefix=".decode_attention-", suffix=".so")
    os.close(handle)
    try:
        result = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True,
                                timeout=BUILD_SECONDS, check=False)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(f"'{' '.join(compiler)}' failed to build {SOURCE.name}: "
                               f"{detail[-1] if detail else f'exit code {result.returncode}'}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    log.info("built the native decode attention: %s", target)
    return target


def _build_key(compiler: list[str]) -> str:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(), _cpu_features().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    """What `-march=native` compiles for: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"
