"""RMSNorm, computed in float32 whatever the engine's dtype.

`weight` holds the multiplier actually applied. Llama-family checkpoints store
it directly; Gemma checkpoints store w and multiply by 1 + w, so the Gemma
model adds the 1 once at load time instead of at every call (the same float32
sum transformers computes on the fly, so results are identical).

`add_and_norm` joins a residual add to the norm that reads it: the decoder
layers pass (residual, normed) pairs along so that each add and its norm run
as one kernel on the GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import fused_for, fusions_on
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

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor,
                     delta_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): a residual add and this norm of its result.

        With `delta_norm` the term added is delta_norm(delta) (Gemma's norms
        after attention and the MLP). Where the fused kernels run it is one
        kernel (see native/kernels/fused.py); elsewhere the same torch ops as
        spelling it out. Unlike forward, it follows `fused_for` on any device,
        so LOCALLLM_NATIVE_ATTENTION=triton runs it interpreted in CPU tests;
        LOCALLLM_NATIVE_FUSED=off keeps it to the separate ops (for A/B timings).
        """
        fused = fused_for(x) if fusions_on() else None
        if fused is not None:
            if delta_norm is None:
                return fused.add_rms_norm(x, delta, self.weight, self.eps)
            return fused.add_rms_norm(x, delta, self.weight, self.eps, delta_norm.weight, delta_norm.eps)
        x = x + (delta if delta_norm is None else delta_norm(delta))
        return x, self(x)
