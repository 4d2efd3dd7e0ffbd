"""Fused elementwise kernels for GPU decoding: RMSNorm, residual add + RMSNorm, rotary, gated activation.

Decoding a small batch on a big GPU is bound by the number of kernels, not by
their work (docs/MEASUREMENTS.md): torch spells RMSNorm as about eight kernels
and rotary as five per tensor, each costing a few microseconds however small. Each function here is one kernel computing the
same formula as its torch reference in native/layers (in float32, rounded once
to the output dtype), so results agree to rounding. `add_rms_norm` goes one
step further and joins a residual add to the norm that reads its result, so
the residual stream between two norms costs one kernel instead of two to four.

All take tensors whose last dimension is contiguous; rows may be strided.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Out, stride_x0, stride_x1, stride_o0, stride_o1, n_inner, eps,
                     DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    row = tl.program_id(0)
    outer = (row // n_inner).to(tl.int64)
    inner = (row % n_inner).to(tl.int64)
    d = tl.arange(0, DIM_PAD)
    ok = d < DIM
    x = tl.load(X + outer * stride_x0 + inner * stride_x1 + d, mask=ok, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / DIM + eps)
    w = tl.load(W + d, mask=ok, other=0.0).to(tl.float32)
    y = (x * scale) * w
    tl.store(Out + outer * stride_o0 + inner * stride_o1 + d, y.to(Out.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of a 2-D (T, dim) or 3-D (T, heads, dim) tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    dim = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 2:
        n_outer, n_inner = x.shape[0], 1
        sx0, sx1, so0, so1 = x.stride(0), 0, out.stride(0), 0
    else:
        n_outer, n_inner = x.shape[0], x.shape[1]
        sx0, sx1, so0, so1 = x.stride(0), x.stride(1), out.stride(0), out.stride(1)
    if n_outer * n_inner == 0:
        return out
    _rms_norm_kernel[(n_outer * n_inner,)](
        x, weight, out, sx0, sx1, so0, so1, n_inner, eps,
        DIM=dim, DIM_PAD=triton.next_power_of_2(dim), num_warps=_row_warps(dim),
    )
    return out


def _row_warps(dim: int) -> int:
    """Warps for a program that reduces one row of `dim`: one warp for a head, four for a hidden state."""
    return 4 if dim >= 1024 else 1


@triton.jit
def _add_rms_norm_kernel(X, Delta, W, DeltaW, Residual, Out, stride_x, stride_d, stride_r, stride_o, eps, delta_eps,
                         NORM_DELTA: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, DIM_PAD)
    ok = d < DIM
    delta = tl.load(Delta + row * stride_d + d, mask=ok, other=0.0).to(tl.float32)
    if NORM_DELTA:  # Gemma's norm after a block; rounded to the dtype as that layer's output is
        delta_scale = 1.0 / tl.sqrt(tl.sum(delta * delta, axis=0) / DIM + delta_eps)
        dw = tl.load(DeltaW + d, mask=ok, other=0.0).to(tl.float32)
        delta = ((delta * delta_scale) * dw).to(Residual.dtype.element_ty).to(tl.float32)
    x = tl.load(X + row * stride_x + d, mask=ok, other=0.0).to(tl.float32)
    residual = (x + delta).to(Residual.dtype.element_ty)  # what torch's x + delta stores
    tl.store(Residual + row * stride_r + d, residual, mask=ok)
    r = residual.to(tl.float32)  # the norm reads the rounded sum, as the layer does
    scale = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / DIM + eps)
    w = tl.load(W + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + d, ((r * scale) * w).to(Out.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta_weight: torch.Tensor | None = None, delta_eps: float | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, normed) for rows of the residual stream `x` and a block's output `delta`, in one kernel.

    residual = x + delta, in x's dtype; normed = RMSNorm(residual, weight, eps).
    With `delta_weight`, delta is first normalised itself (Gemma's norm after
    attention or the MLP): residual = x + RMSNorm(delta, delta_weight, delta_eps
    (default eps)). x and delta: same shape and dtype, last dimension contiguous.
    """
    if x.shape != delta.shape or x.dtype != delta.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and delta {tuple(delta.shape)} {delta.dtype} must match")
    dim = x.shape[-1]
    x2, d2 = x.reshape(-1, dim), delta.reshape(-1, dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if d2.stride(-1) != 1:
        d2 = d2.contiguous()
    residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return residual, normed
    _add_rms_norm_kernel[(rows,)](
        x2, d2, weight, weight if delta_weight is None else delta_weight, residual, normed,
        x2.stride(0), d2.stride(0), dim, dim, eps, eps if delta_eps is None else delta_eps,
        NORM_DELTA=delta_weight is not None, DIM=dim, DIM_PAD=triton.next_power_of_2(dim), num_warps=_row_warps(dim),
    )
    return residual, normed


@triton.jit
def _rotary_kernel(X, Cos, Sin, Out, stride_x0, stride_x1, stride_c, n_heads,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    row = tl.program_id(0)
    token = (row // n_heads).to(tl.int64)
    head = (row % n_heads).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    ok = d < HALF
    base = X + token * stride_x0 + head * stride_x1
    x1 = tl.load(base + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(Cos + token * stride_c + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + token * stride_c + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + token * stride_c + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + token * stride_c + HALF + d, mask=ok, other=0.0).to(tl.float32)
    out = Out + (token * n_heads + head) * (2 * HALF)
    tl.store(out + d, (x1 * c1 - x2 * s1).to(Out.dtype.element_ty), mask=ok)
    tl.store(out + HALF + d, (x2 * c2 + x1 * s2).to(Out.dtype.element_ty), mask=ok)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, head_dim), cos and sin (T, head_dim) in the half-split layout -> a new contiguous tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    n, heads, dim = x.shape
    out = torch.empty((n, heads, dim), dtype=x.dtype, device=x.device)
    if n * heads == 0:
        return out
    half = dim // 2
    _rotary_kernel[(n * heads,)](
        x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), heads,
        HALF=half, HALF_PAD=triton.next_power_of_2(half), num_warps=1,
    )
    return out


@triton.jit
def _gated_kernel(GateUp, Out, stride_g, stride_o, n_cols, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(GateUp + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GateUp + row * stride_g + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    if GELU:  # tanh approximation, as gelu_pytorch_tanh
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(inner))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(inner >= 0, t, -t)
        act = 0.5 * g * (1.0 + t)
    else:  # silu
        act = g / (1.0 + tl.exp(-g))
    tl.store(Out + row * stride_o + cols, (act * u).to(Out.dtype.element_ty), mask=ok)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for a (T, 2 * intermediate) tensor holding gate then up -> (T, intermediate)."""
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    n, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n, cols), dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return out
    block = 1024
    _gated_kernel[(n, triton.cdiv(cols, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), cols, GELU=activation == "gelu_tanh", BLOCK=block, num_warps=4,
    )
    return out
