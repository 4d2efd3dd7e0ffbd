"""The planner's knobs: margins, the native engine's bar, the default context cap.

Each has an environment override (sizes as "1GiB" or "512MiB", the grammar
of localllm/core/units.py; fractions as "0.1"), so a user can tune the planner without code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from localllm.core.errors import BadRequest
from localllm.core.units import GIB, parse_size


@dataclass(frozen=True)
class FitSettings:
    vram_margin_bytes: int = 1 * GIB  # kept free on every GPU: other programs, fragmentation
    ram_margin_fraction: float = 0.10  # of the machine's RAM, kept for the system and other programs
    native_min_vram_bytes: int = 16 * GIB  # the native engine only on a card at least this big...
    native_min_compute_capability: float = 8.0  # ...with bf16 tensor cores (Ampere and later)
    context_cap: int = 8192  # an automatic context never exceeds this (a user may ask for more)
    context_step: int = 256  # automatic contexts are multiples of this

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FitSettings:
        """Defaults, overridden by LOCALLLM_FIT_* variables."""
        env = os.environ if environ is None else environ
        values: dict = {}
        if "LOCALLLM_FIT_VRAM_MARGIN" in env:
            values["vram_margin_bytes"] = parse_size(env["LOCALLLM_FIT_VRAM_MARGIN"], "LOCALLLM_FIT_VRAM_MARGIN")
        if "LOCALLLM_FIT_RAM_MARGIN" in env:
            values["ram_margin_fraction"] = _fraction(env["LOCALLLM_FIT_RAM_MARGIN"], "LOCALLLM_FIT_RAM_MARGIN")
        if "LOCALLLM_FIT_NATIVE_MIN_VRAM" in env:
            values["native_min_vram_bytes"] = parse_size(env["LOCALLLM_FIT_NATIVE_MIN_VRAM"], "LOCALLLM_FIT_NATIVE_MIN_VRAM")
        if "LOCALLLM_FIT_CONTEXT_CAP" in env:
            values["context_cap"] = _positive_int(env["LOCALLLM_FIT_CONTEXT_CAP"], "LOCALLLM_FIT_CONTEXT_CAP")
        return cls(**values)


def _fraction(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{what} must be a fraction such as 0.1, got {text!r}") from None
    if not 0 <= value < 1:
        raise BadRequest(f"{what} must be at least 0 and below 1, got {text}")
    return value


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{what} must be a whole number, got {text!r}") from None
    if value < 16:
        raise BadRequest(f"{what} must be at least 16, got {text}")
    return value
