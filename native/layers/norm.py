"""RMSNorm, computed in float32 whatever the engine's dtype.

`weight` holds the multiplier actually applied. Llama-family checkpoints store
it directly; Gemma checkpoints store w and multiply by 1 + w, so the Gemma
model adds the 1 once at load time instead of at every call (the same float32
sum transformers computes on the fly, so results are identical).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import fused_for
from .linear import empty_parameter


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_parameter(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_for(x) if x.is_cuda else None
        if fused is not None:  # one kernel instead of eight (see native/kernels/fused.py)
            return fused.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).to(x.dtype)
