"""Quantized weight values, independent of any device's kernel layout.

`QuantValues` is the one plain form every quantized weight passes through:
GGUF blocks kept as they are (gguf_blocks.py) and float weights requantized
(requantize.py) both land here, fused projections concatenate here, and
`dequantize` gives the float32 reference every kernel is tested against.
Kernel layouts (packed nibbles, tiled int32 words, bfloat16 scales) are made
from it per device in weight.py and embedding.py.

Formats:
  int4  q uint8 (N, K) values 0..15, one per byte; scales and zeros float32
        (N, K // group): w = (q - 8) * scale + zero. The same form as torch's
        int4 kernels, so GGUF Q4_0/Q4_1/Q4_K map onto it without requantizing.
  int8  q int8 (N, K); scales float32 (N,) per output row (group 0): w = q * scale.
        With group > 0, scales are (N, K // group): Q8_0 kept exactly, for
        tables that are only gathered (QuantEmbedding); the int8 matmul kernel
        takes one scale per row, so QuantWeight refuses grouped int8.
  fp8   q float8_e4m3fn (N, K); scales float32 (N,) per output row: w = q * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int4", "int8", "fp8")
GROUP = 32  # int4 group along K: GGUF's block (Q4_0, Q4_1) and sub-block (Q4_K) size
INT4_OFFSET = 8  # int4 values 0..15 stand for q - 8


@dataclass
class QuantValues:
    fmt: str
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown quantized format {self.fmt!r} (known: {', '.join(FORMATS)})")
        n, k = self.q.shape
        if self.group:
            if k % self.group:
                raise ValueError(f"{self.fmt} values with {k} columns cannot be split into groups of {self.group}")
            expected: tuple[int, ...] = (n, k // self.group)
        else:
            expected = (n,)
        if tuple(self.scales.shape) != expected:
            raise ValueError(f"{self.fmt} scales have shape {tuple(self.scales.shape)}, expected {expected}")
        if (self.fmt == "int4") != (self.zeros is not None):
            raise ValueError("int4 values carry zeros; int8 and fp8 values do not")
        if self.fmt == "int4" and not self.group:
            raise ValueError("int4 values need a group size")

    def rows(self, start: int, stop: int) -> "QuantValues":
        """Rows start..stop as views (no copy)."""
        zeros = None if self.zeros is None else self.zeros[start:stop]
        return QuantValues(self.fmt, self.q[start:stop], self.scales[start:stop], zeros, self.group)


def dequantize(v: QuantValues) -> torch.Tensor:
    """The float32 (N, K) weight the values stand for: the reference for every kernel."""
    n, k = v.shape
    if v.fmt == "int4":
        assert v.zeros is not None
        q = (v.q.to(torch.float32) - INT4_OFFSET).view(n, k // v.group, v.group)
        return (q * v.scales.unsqueeze(-1) + v.zeros.unsqueeze(-1)).view(n, k)
    q = v.q.to(torch.float32)
    if v.group:
        return (q.view(n, k // v.group, v.group) * v.scales.unsqueeze(-1)).view(n, k)
    return q * v.scales.unsqueeze(-1)


def concat_rows(parts: list[QuantValues]) -> QuantValues:
    """Stack values along N (fused q/k/v, gate/up); every part has the same format, group and K."""
    if not parts:
        raise ValueError("concat_rows needs at least one part")
    first = parts[0]
    for part in parts[1:]:
        if (part.fmt, part.group, part.shape[1]) != (first.fmt, first.group, first.shape[1]):
            raise ValueError(
                f"cannot stack {part.fmt}/group {part.group}/K {part.shape[1]} rows under "
                f"{first.fmt}/group {first.group}/K {first.shape[1]} rows"
            )
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts if p.zeros is not None])
    return QuantValues(
        first.fmt,
        torch.cat([p.q for p in parts]),
        torch.cat([p.scales for p in parts]),
        zeros,
        first.group,
    )


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K) values 0..15 -> uint8 (N, K/2), value 2j in the low nibble of byte j."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def take_rows(v: QuantValues, index: torch.Tensor) -> QuantValues:
    """The rows `index` in that order (a row permutation such as GGUF's q/k head order)."""
    zeros = None if v.zeros is None else v.zeros[index]
    return QuantValues(v.fmt, v.q[index], v.scales[index], zeros, v.group)
