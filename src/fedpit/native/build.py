"""Builds the decode kernels' C sources (decode_attention.c, decode_ops.c, decode_linear.c, decode_layers.c) into
one library, once per machine.

The sources ship with fedpit and the system C compiler (`$CC`, else `cc`) builds them at first use into
`<cache>/native/` (`model.cache_dir`, `$FEDPIT_CACHE`, or ~/.cache/fedpit), for the machine's own vector
instructions (`-march=native`). The file name carries a hash of the sources, the compiler, the flags and
the CPU's features, so a shared cache never serves a library built for another CPU, and a build is written
under a temporary name and renamed, so a concurrent process never loads half a library. The kernels need
nothing of torch's headers: plain C loaded with ctypes builds in under a second, where torch's
`cpp_extension.load_inline` would take tens of seconds on 2 cores, and ninja.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DIRECTORY = Path(__file__).parent
SOURCES = tuple(DIRECTORY / name
                for name in ("decode_attention.c", "decode_ops.c", "decode_linear.c", "decode_layers.c"))
HEADERS = (DIRECTORY / "bf16.h", DIRECTORY / "kernels.h")
# -fassociative-math lets the compiler vectorise the sums (with the two flags it requires); -ffast-math is
# avoided on purpose: linked into a shared library it switches the whole process to flush-to-zero.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-fPIC", "-shared")
BUILD_SECONDS = 120


def build(cache: Path, source_dir: Path = DIRECTORY) -> Path:
    """The compiled library in `cache`/native, compiled now if none for these sources, compiler and CPU is there.
    `source_dir` holds the files named in SOURCES and HEADERS: fedpit's own, or another revision's
    (benchmarks/kernels_ab.py compares two)."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler: '{' '.join(compiler) or '$CC'}' was not found")
    sources = [source_dir / path.name for path in SOURCES]
    directory = cache / "native"
    target = directory / f"decode-kernels-{_build_key(compiler, source_dir)}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a concurrent process never loads half a library.
    handle, partial = tempfile.mkstemp(dir=directory, prefix=".decode-kernels-", suffix=".so")
    os.close(handle)
    try:
        command = [*compiler, *FLAGS, "-I", str(source_dir), *map(str, sources), "-o", partial, "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS, check=False)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(f"'{' '.join(compiler)}' failed to build {', '.join(s.name for s in SOURCES)}: "
                               f"{detail[-1] if detail else f'exit code {result.returncode}'}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    log.info("built the native decode kernels: %s", target)
    return target


def _build_key(compiler: list[str], source_dir: Path) -> str:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    digest = hashlib.sha256()
    parts = [(source_dir / path.name).read_bytes() for path in SOURCES + HEADERS]
    for part in (*parts, version.encode(), " ".join(FLAGS).encode(), _cpu_features().encode()):
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
