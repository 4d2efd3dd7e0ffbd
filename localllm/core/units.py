"""Sizes and counts: the one grammar for sizes people type, and the forms tables print.

Every size a user gives (`--kv-cache`, `--vram`, `--ram`, `--max-body`, the
LOCALLLM_FIT_* margins) goes through `parse_size`. Units are binary, as
memory is counted by Ollama and llama.cpp users: 12G, 12GB and 12GiB all
mean 12 x 2^30 bytes. Decimals are allowed (7.5GiB); a bare number is bytes.
"""

from __future__ import annotations

import re

from localllm.core.errors import BadRequest

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
SIZE_HELP = "binary units, GB = GiB, decimals allowed; a bare number is bytes"

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?", re.IGNORECASE)
_UNITS = {"b": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB}


def parse_size(text: str, what: str) -> int:
    """Bytes from "12GiB", "7.5G", "512MiB", "64KiB" or "1048576"; `what` names the flag in the error."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise BadRequest(f"{what} must be a size such as 7.5GiB, 512MiB or 1048576 (bytes), got {text[:40]!r}")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    size = number * _UNITS[unit[0]]
    if size >= 2**63:  # float("9" * 400) is inf: no int
        raise BadRequest(f"{what} is too large, got {text[:40]!r}")
    return int(size)


def gib(n: int | float) -> str:
    """A size for a plan's table: GiB with two decimals, MiB below one GiB."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB"


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def human_count(n: int) -> str:
    """Parameter counts the way model cards write them: 268M, 1.2B, 70B."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B".replace(".0B", "B")
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return str(n)
