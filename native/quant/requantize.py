"""Float weights to quantized values (for types that cannot be kept as they are).

int4: asymmetric per group of 32 along K. Each group's range [min, max] is cut
into 15 steps and values round to the nearest step, so no value is off by
more than half a step (scale / 2). Stored as w = (q - 8) * scale + zero.
int8: symmetric per output row, scale = max|w| / 127, rounding to nearest.
fp8:  per output row, scale = max|w| / 448 (e4m3's largest finite value),
      then e4m3's own round-to-nearest.

Large tables (the 262,144-row embedding) are done a slice of rows at a time,
so the temporaries stay a few MB whatever the tensor's size.
"""

from __future__ import annotations

import torch

from .values import FORMATS, GROUP, INT4_OFFSET, QuantValues

INT4_STEPS = 15
INT8_MAX = 127
FP8_MAX = 448.0
SLICE_VALUES = 1 << 22  # values requantized per slice of rows


def from_float(w: torch.Tensor, fmt: str) -> QuantValues:
    """An (N, K) float weight requantized to `fmt` (on w's device)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r} (known: {', '.join(FORMATS)})")
    if w.dim() != 2:
        raise ValueError(f"only 2-D weights are quantized, got shape {tuple(w.shape)}")
    n, k = w.shape
    if fmt == "int4" and k % GROUP:
        raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {k}")
    rows_per_slice = max(1, SLICE_VALUES // max(k, 1))
    parts = [_QUANTIZERS[fmt](w[i : i + rows_per_slice].float()) for i in range(0, n, rows_per_slice)]
    q, scales, zeros = (torch.cat(t) if t[0] is not None else None for t in zip(*parts))
    assert q is not None and scales is not None
    return QuantValues(fmt, q, scales, zeros, GROUP if fmt == "int4" else 0)


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / INT4_STEPS
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = ((groups - low.unsqueeze(-1)) * inverse.unsqueeze(-1)).round_().clamp_(0, INT4_STEPS)
    return q.to(torch.uint8).reshape(n, k), scale, low + INT4_OFFSET * scale


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    scale = w.abs().amax(-1) / INT8_MAX
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (w * inverse.unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale, None


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    scale = w.abs().amax(-1) / FP8_MAX
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (w * inverse.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale, None


_QUANTIZERS = {"int4": _int4, "int8": _int8, "fp8": _fp8}
