"""GGUF tensor data to float tensors, in torch.

Why torch: the `gguf` package's numpy dequantizers take seconds per model and
allocate many temporaries; these are the same formulas written as a few
vectorised torch ops over all blocks at once, so loading the starter takes
about a second. Each function takes the raw bytes of a tensor as a uint8
tensor of shape (n_blocks, bytes_per_block) and returns float32 values of
shape (n_blocks, values_per_block). The arithmetic follows ggml's reference
dequantizers term by term (scale times quant, minus scaled minimum), so the
results are bit-identical to theirs.

Block layouts (ggml's, little-endian; "f16" is an IEEE half):
  Q8_0  32 values: f16 d, 32 x int8 q;                 x = q * d
  Q4_0  32 values: f16 d, 16 bytes of nibbles;         x = (q - 8) * d
  Q5_0  32 values: f16 d, u32 high bits, 16 bytes;     x = (q - 16) * d
  Q4_1  32 values: f16 d, f16 m, 16 bytes of nibbles;  x = q * d + m
  Q5_1  32 values: f16 d, f16 m, u32 high bits, 16 bytes; x = q * d + m
  Q4_K  256 values in 8 groups of 32: f16 d, f16 dmin, 12 bytes of packed 6-bit
        group scales and minimums, 128 bytes of nibbles; x = d*sc*q - dmin*m
  Q5_K  as Q4_K plus 32 bytes holding each value's fifth bit
  Q6_K  256 values in 16 groups of 16: 128 bytes low nibbles, 64 bytes of 2-bit
        high parts, 16 x int8 group scales, f16 d;   x = d*sc*(q - 32)
"""

from __future__ import annotations

from typing import Callable

import torch

from localllm.core.errors import BadModelFile

QK_K = 256


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The half-precision scalar at byte `start` of every block, as float32 (n_blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2, k): low nibbles, then high nibbles."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) single bits, least significant bit of byte 0 first."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)


def dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return q.mul_(d)  # in place: the embedding table alone is hundreds of MB


def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).reshape(blocks.shape[0], 32).to(torch.int8) - 8
    return q.float().mul_(d)


def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    high = _bits(blocks[:, 2:6])  # bit j is the fifth bit of value j
    low = _nibbles(blocks[:, 6:]).reshape(blocks.shape[0], 32)
    q = (low | (high << 4)).to(torch.int8) - 16
    return q.float().mul_(d)


def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).reshape(blocks.shape[0], 32).float()
    return q.mul_(d).add_(m)


def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    high = _bits(blocks[:, 4:8])  # bit j is the fifth bit of value j
    low = _nibbles(blocks[:, 8:]).reshape(blocks.shape[0], 32)
    q = (low | (high << 4)).float()
    return q.mul_(d).add_(m)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit minimums packed into 12 bytes (Q4_K, Q5_K).

    Bytes 0-3 hold scales 0-3 in their low six bits, bytes 4-7 minimums 0-3;
    scales and minimums 4-7 take their low four bits from bytes 8-11 and their
    top two bits from the spare high bits of bytes 0-3 and 4-7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)), dim=1)
    mins = torch.cat((b & 0x3F, (c >> 4) | ((b >> 6) << 4)), dim=1)
    return scales.float(), mins.float()


def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scales(blocks[:, 4:16])
    # 4 chunks of 32 bytes; the low nibbles are group 2c, the high nibbles group 2c+1.
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32).reshape(n * 4, 32)).reshape(n, 8, 32).float()
    scale = (d * sc).unsqueeze(-1)
    minimum = (dmin * m).unsqueeze(-1)
    return (scale * q - minimum).reshape(n, QK_K)


def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scales(blocks[:, 4:16])
    high = blocks[:, 16:48]  # bit g of byte l is the fifth bit of value l in group g
    low = _nibbles(blocks[:, 48:].reshape(n * 4, 32)).reshape(n, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    fifth = (high.unsqueeze(1) >> shifts) & 1
    q = (low | (fifth << 4)).float()
    scale = (d * sc).unsqueeze(-1)
    minimum = (dmin * m).unsqueeze(-1)
    return (scale * q - minimum).reshape(n, QK_K)


def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    low = blocks[:, :128].reshape(n, 2, 2, 32)  # half, (bytes 0-31, 32-63), lane
    high = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks, 208)
    # Within each half of 128 values, the four runs of 32 take: low nibbles of
    # bytes 0-31, low nibbles of 32-63, high nibbles of 0-31, high nibbles of
    # 32-63; their top two bits come from bits 0-1, 2-3, 4-5, 6-7 of `high`.
    nib = torch.cat((low & 0x0F, low >> 4), dim=2)  # (n, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    top = (high >> shifts) & 0x03
    q = ((nib | (top << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    scale = (d * scales).unsqueeze(-1)
    return (scale * q).reshape(n, QK_K)


# ggml type name -> (values per block, bytes per block, dequantizer)
DEQUANTIZERS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "F32": (1, 4, dequant_f32),
    "F16": (1, 2, dequant_f16),
    "BF16": (1, 2, dequant_bf16),
    "Q8_0": (32, 34, dequant_q8_0),
    "Q4_0": (32, 18, dequant_q4_0),
    "Q5_0": (32, 22, dequant_q5_0),
    "Q4_1": (32, 20, dequant_q4_1),
    "Q5_1": (32, 24, dequant_q5_1),
    "Q4_K": (QK_K, 144, dequant_q4_k),
    "Q5_K": (QK_K, 176, dequant_q5_k),
    "Q6_K": (QK_K, 210, dequant_q6_k),
}


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...], *, name: str = "") -> torch.Tensor:
    """Raw tensor bytes (uint8, 1-D) -> float32 tensor of `shape` (torch order: slowest dim first)."""
    if type_name not in DEQUANTIZERS:
        supported = ", ".join(DEQUANTIZERS)
        raise BadModelFile(f"tensor {name} is {type_name}, which the native engine cannot read (it reads {supported})")
    per_block, block_bytes, fn = DEQUANTIZERS[type_name]
    n_values = 1
    for dim in shape:
        n_values *= dim
    if n_values % per_block or raw.numel() != n_values // per_block * block_bytes:
        raise BadModelFile(f"tensor {name}: {raw.numel()} bytes do not hold {n_values} {type_name} values")
    blocks = raw.view(-1, block_bytes)
    return fn(blocks).reshape(shape)
