"""Rotary position embeddings in the half-split layout transformers uses.

Frequencies follow the published formulas (plain, linear scaling, Llama 3's
smooth long-context scaling, or per-frequency divisors a GGUF file carries);
angles are position x inverse frequency in float32, as transformers computes
them, so cos and sin agree bit for bit.
"""

from __future__ import annotations

import math

import torch

from localllm.core.model_config import RopeSpec
from ..kernels import fused_for


def inverse_frequencies(spec: RopeSpec, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (spec.theta**exponents)
    if spec.freq_divisors is not None:
        return inv / torch.tensor(spec.freq_divisors, dtype=torch.float32)
    if spec.scaling == "linear":
        return inv / spec.factor
    if spec.scaling == "llama3":
        return _llama3(inv, spec)
    return inv


def _llama3(inv: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Long wavelengths are divided by `factor`, short ones kept, the band between blended."""
    low_wavelen = spec.original_max_position / spec.low_freq_factor
    high_wavelen = spec.original_max_position / spec.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / spec.factor, inv)
    smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class Rotary:
    """cos/sin for a batch of positions under one RopeSpec."""

    def __init__(self, spec: RopeSpec, head_dim: int, device: torch.device) -> None:
        self.inv_freq = inverse_frequencies(spec, head_dim).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); cos, sin: (T, head_dim)."""
    fused = fused_for(x) if x.is_cuda else None
    if fused is not None:  # one kernel instead of five (see native/kernels/fused.py)
        return fused.apply_rotary(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
