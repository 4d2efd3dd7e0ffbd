"""The gated feed-forward block: down(act(gate(x)) * up(x)).

Gate and up are one fused matrix, so each step runs one matrix product where
a checkpoint has two (fewer, larger calls are faster on every device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_for
from .linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = fused_for(gate_up) if gate_up.is_cuda else None
        if fused is not None:  # one kernel instead of two or three (see native/kernels/fused.py)
            return self.down_proj(fused.gated_activation(gate_up, self.activation))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        if self.activation == "gelu_tanh":
            gate = F.gelu(gate, approximate="tanh")
        else:
            gate = F.silu(gate)
        return self.down_proj(gate * up)
