"""The data layouts torch's quantized kernels expect, and which devices run them.

Pure tensor rearrangements and decisions, so they are tested on the CPU even
for the CUDA kernels:
- int4 scales and zeros go to the kernels as one (K / group, N, 2) tensor in
  the activation dtype (bfloat16).
- CUDA's `_convert_weight_to_int4pack` takes (N, K / 2) uint8 pairs with the
  EVEN column in the HIGH nibble, and a count of 16-wide k-tiles packed side
  by side (2, 4 or 8) that must divide K / 16.
- The CPU int4 packer needs N divisible by 16 (CUDA's tiles by 8): other
  shapes are padded with zero rows and the extra outputs dropped.
- fp8 `_scaled_mm` on CUDA needs compute capability 8.9 (Ada) or later; the
  int4 tile kernel needs 8.0 (Ampere).
"""

from __future__ import annotations

import torch

from .values import INT4_OFFSET, QuantValues

INT4_ROW_MULTIPLE = 16
CPU_INT4_ROW_BLOCK = 64  # the CPU packer lays out rows in independent blocks of 64
FP8_MIN_CAPABILITY = (8, 9)
INT4_CUDA_MIN_CAPABILITY = (8, 0)


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(v: QuantValues, multiple: int) -> QuantValues:
    """Values with zero rows appended up to a multiple of `multiple` rows (the same values if none are needed)."""
    n, k = v.shape
    extra = padded(n, multiple) - n
    if not extra:
        return v
    fill = INT4_OFFSET if v.fmt == "int4" else 0  # int4 8 is the value 0
    q = torch.cat((v.q, torch.full((extra, k), fill, dtype=v.q.dtype, device=v.q.device)))
    scales = torch.cat((v.scales, v.scales.new_zeros((extra, *v.scales.shape[1:]))))
    zeros = None if v.zeros is None else torch.cat((v.zeros, v.zeros.new_zeros((extra, *v.zeros.shape[1:]))))
    return QuantValues(v.fmt, q, scales, zeros, v.group)


def int4_scales_and_zeros(v: QuantValues, dtype: torch.dtype) -> torch.Tensor:
    """(N, K / group) scales and zeros -> the kernels' (K / group, N, 2) tensor."""
    assert v.zeros is not None
    return torch.stack((v.scales, v.zeros), dim=-1).transpose(0, 1).contiguous().to(dtype)


def cuda_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K) values 0..15 -> (N, K / 2) bytes as CUDA's int4 packer reads them (column 2j high)."""
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def cuda_inner_k_tiles(k: int) -> int:
    """The widest run of 16-wide k-tiles (8, 4 or 2) that divides K; the tile kernel needs at least 2."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"the CUDA int4 kernel needs in_features divisible by 32, got {k}")


def capability_at_least(capability: tuple[int, int] | None, needed: tuple[int, int]) -> bool:
    return capability is not None and tuple(capability) >= needed


def fp8_refusal(device_type: str, capability: tuple[int, int] | None) -> str | None:
    """Why fp8 weights cannot run on this device, in one line; None where they can."""
    if device_type == "cpu":
        return None
    if device_type == "cuda" and capability_at_least(capability, FP8_MIN_CAPABILITY):
        return None
    if device_type == "cuda":
        major, minor = capability if capability is not None else (0, 0)
        return (
            f"fp8 weights need a GPU of compute capability 8.9 or later (this one is {major}.{minor}); "
            "use int8 or int4 weights instead"
        )
    return f"fp8 weights run on CPU or CUDA, not on {device_type}"


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)
