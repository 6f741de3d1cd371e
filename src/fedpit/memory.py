"""Freed memory stays in the process, so the next batch's large tensors reuse it instead of faulting it in.

glibc serves every allocation above 32 MiB with a fresh `mmap` and gives it back to the kernel on
`free`. A training step's logits over a 49k vocabulary, their fp32 copy for the loss and its
gradient are such allocations (hundreds of MiB on SmolLM2), so every step the kernel zero-fills
them again, page by page, on the step's critical path. With `mmap` off for the allocator and
trimming deferred, freed blocks stay in the heap and the next step reuses them: bf16 training on
2 cores ran at 1.26x; with the chunked LM-head loss (engines/head_loss.py), which removes the largest
of those tensors, at 1.10x, not significant (`benchmarks/training_ab.py --lever memory`). The price is that the
process keeps its peak memory until it exits, which a process that trains reaches every step anyway.

Limits, both glibc's: a thread other than the main one (or the main thread after an allocation
failed) allocates from an arena of its own, where blocks over 64 MiB are mapped anew whatever this
says; and torch's 64-byte-aligned requests ask a little more than the block they get, so a freed
block is reused by a smaller tensor, or by one of the same size once it merges with a freed
neighbour, which a training step's many tensors usually give it.

`FEDPIT_KEEP_FREED_MEMORY=0` leaves glibc's defaults; on other C libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

from fedpit.errors import ConfigError

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory for reuse (once per process); True if it is on."""
    global _applied
    if _applied:
        return True
    setting = os.environ.get("FEDPIT_KEEP_FREED_MEMORY", "1").strip()
    if setting not in ("0", "1"):
        raise ConfigError(f"FEDPIT_KEEP_FREED_MEMORY={setting!r}: set it to 1 (keep freed memory, the default) or 0 "
                          "(glibc's defaults), or unset it")
    if setting == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        applied = False
    if not applied:
        log.warning("could not set glibc's allocator to keep freed memory; training runs, a little slower")
    _applied = applied
    return applied
