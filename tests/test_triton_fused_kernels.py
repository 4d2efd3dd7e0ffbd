"""The fused elementwise Triton kernels (native/kernels/fused.py) against the torch layers, interpreted.

Like tests/test_triton_kernels.py this runs under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernels are imported). The references are
the CPU paths of native/layers, which the model tests pin against transformers.
"""

from __future__ import annotations

import triton_preamble  # noqa: F401  (first: Triton's interpreter on, before the kernels load)

import pytest
import torch
import torch.nn.functional as F

from native.kernels import fused
from native.layers.norm import RMSNorm
from native.layers.rotary import apply_rotary

GEN = torch.Generator().manual_seed(0)


def _norm(dim: int) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6)
    norm.weight = torch.nn.Parameter(1 + torch.randn(dim, generator=GEN) * 0.3, requires_grad=False)
    return norm


@pytest.mark.parametrize("dim", [64, 80, 640])
def test_fused_rms_norm_kernel_matches_the_layer_on_rows(dim):
    norm = _norm(dim)
    x = torch.randn(5, dim, generator=GEN) * 3
    torch.testing.assert_close(fused.rms_norm(x, norm.weight, norm.eps), norm(x), rtol=1e-5, atol=1e-5)


def test_fused_rms_norm_kernel_matches_the_layer_on_strided_heads():
    """Per-head q/k norms read a slice of the fused QKV output: rows are strided."""
    norm = _norm(32)
    qkv = torch.randn(6, 4 * 32 + 2 * 2 * 32, generator=GEN)
    q = qkv[:, : 4 * 32].view(6, 4, 32)
    torch.testing.assert_close(fused.rms_norm(q, norm.weight, norm.eps), norm(q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "dim"), [(4, 32), (2, 80), (1, 256)])
def test_fused_rotary_kernel_matches_the_reference(heads, dim):
    n = 7
    x = torch.randn(n, heads + 1, dim, generator=GEN)[:, 1:]  # a strided view, as after the QKV split
    angles = torch.randn(n, dim // 2, generator=GEN) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    torch.testing.assert_close(fused.apply_rotary(x, cos, sin), apply_rotary(x, cos, sin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_gated_activation_kernel_matches_torch(activation):
    inter = 1100  # not a multiple of the kernel's block
    gate_up = torch.randn(3, 2 * inter, generator=GEN) * 4
    gate, up = gate_up.split(inter, dim=-1)
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)
    torch.testing.assert_close(fused.gated_activation(gate_up, activation), act * up, rtol=1e-5, atol=1e-5)


def test_fused_kernels_round_once_to_bfloat16():
    """In bfloat16 the kernels compute in float32 and round once: within one bfloat16 step of the layer."""
    norm = _norm(64)
    x = (torch.randn(4, 64, generator=GEN) * 3).bfloat16()
    norm_bf16 = fused.rms_norm(x, norm.weight, norm.eps)
    assert norm_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(norm_bf16.float(), norm(x).float(), rtol=1e-2, atol=1e-2)
