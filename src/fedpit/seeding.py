"""Seeds derived from names, so a client's randomness does not depend on who ran before it."""

from __future__ import annotations

import hashlib


def derive_seed(base: int, *parts: object) -> int:
    text = ":".join([str(base), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
