"""Named failpoints: places where a test can make the process die on purpose.

`FEDPIT_FAILPOINT=name[:n]` kills the process with SIGKILL the n-th time (default the first)
execution passes `failpoint(name)`. Nothing happens when the variable is unset, which is always
the case outside the kill-and-resume tests; the check costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def failpoint(name: str) -> None:
    spec = os.environ.get("FEDPIT_FAILPOINT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
