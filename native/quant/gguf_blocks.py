"""GGUF 4-bit blocks kept as int4 values, without requantizing.

Q4_0, Q4_1 and Q4_K all store 32 values per (sub-)block as 4-bit integers
with one scale and one offset, so each maps exactly onto torch's int4 form
w = (q - 8) * scale + zero with groups of 32:
  Q4_0  w = (q - 8) * d                 scale d,      zero 0
  Q4_1  w = q * d + m                   scale d,      zero m + 8d
  Q4_K  w = d*sc * q - dmin*m           scale d*sc,   zero 8*d*sc - dmin*m
The quants are copied bit for bit; only the scales and zeros are recomputed
in float32 (so `dequantize` matches gguf_dequant up to their rounding).

int8: Q8_0 has a scale per 32 values, but torch's int8 matmul takes one
scale per output row. Rather than a grouped kernel of our own, Q8_0 returns
None here (the caller requantizes the dequantized floats per row, an error of
at most half a row step); `keep_groups=True` keeps Q8_0 exactly as grouped
int8 for tables that are only gathered (QuantEmbedding).
Every other type (Q5_*, Q6_K, Q8_0 for int4, F16, ...) returns None.
"""

from __future__ import annotations

import torch

from native.gguf_dequant import DEQUANTIZERS, QK_K, _f16, _k_scales, _nibbles

from .values import GROUP, INT4_OFFSET, QuantValues


def from_gguf_blocks(
    raw: torch.Tensor, type_name: str, shape: tuple[int, int], fmt: str, *, keep_groups: bool = False
) -> QuantValues | None:
    """A GGUF tensor's bytes (uint8, 1-D) as `fmt` values, or None when they cannot be kept exactly."""
    n, k = shape
    if fmt == "int4" and type_name in _INT4_READERS:
        blocks = _blocks(raw, type_name, n, k)
        q, scales, zeros = _INT4_READERS[type_name](blocks)
        return QuantValues("int4", q.reshape(n, k), scales.reshape(n, k // GROUP), zeros.reshape(n, k // GROUP), GROUP)
    if fmt == "int8" and type_name == "Q8_0" and keep_groups:
        blocks = _blocks(raw, type_name, n, k)
        q = blocks[:, 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantValues("int8", q, _f16(blocks, 0).reshape(n, k // GROUP), None, GROUP)
    return None


def _blocks(raw: torch.Tensor, type_name: str, n: int, k: int) -> torch.Tensor:
    per_block, block_bytes, _ = DEQUANTIZERS[type_name]
    if k % per_block or raw.numel() != n * k // per_block * block_bytes:
        raise ValueError(f"{raw.numel()} bytes do not hold a {n} x {k} {type_name} tensor")
    return raw.view(-1, block_bytes)


def _q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).reshape(-1, GROUP)
    return q, d, torch.zeros_like(d)


def _q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).reshape(-1, GROUP)
    return q, d, m + INT4_OFFSET * d


def _q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scales(blocks[:, 4:16])
    # As gguf_dequant: 4 chunks of 32 bytes, low nibbles group 2c, high nibbles group 2c+1.
    q = _nibbles(blocks[:, 16:].reshape(n * 4, 32)).reshape(n, QK_K)
    scale = d * sc
    return q, scale, INT4_OFFSET * scale - dmin * m


_INT4_READERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}
