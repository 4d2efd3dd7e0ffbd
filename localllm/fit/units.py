"""Memory sizes as people say them ("12GiB", "12GB", "12") and as the planner prints them.

Sizes of memory are binary here: a "12 GB" graphics card has 12 GiB, so 12G,
12GB and 12GiB all mean 12 x 2^30 bytes, and a bare number means GiB.
"""

from __future__ import annotations

import re

from localllm.core.errors import BadRequest

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?", re.IGNORECASE)
_UNITS = {"b": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB}


def parse_size(text: str, what: str) -> int:
    """Bytes from "12GiB", "7.5G", "512MiB", "0"; a bare number is GiB."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise BadRequest(f"{what} must be a size such as 12GiB, 7.5GiB or 512MiB, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "g").lower()
    size = number * _UNITS[unit[0]]
    if size >= 2**63:  # float("9" * 400) is inf: no int
        raise BadRequest(f"{what} is too large, got {text[:40]!r}")
    return int(size)


def gib(n: int | float) -> str:
    """A size for a table: GiB with two decimals, MiB below one GiB."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB"
