"""A decode step's new tokens before attention, in one kernel: q/k norms, rotary, and the K/V store.

Between the QKV projection and paged attention a decode step runs, per
layer, up to five small kernels: RMSNorm of the query heads and of the key
heads (Qwen3, Gemma 3), rotary on each, and the KV-cache store. At batch
sizes where each launch costs more than its work, one launch does all of it:
program (t, h) takes query head h of token t, and key and value head h when
h < n_kv, and writes the query to a new tensor and the key and value into
the token's cache slot.

It computes what those kernels compute, in the same order: the norm in
float32 rounded to the model's dtype (RMSNorm's output), rotary on that in
float32 rounded once (rotary's output), the key then converted to the
cache's dtype (store_kv). Rotary is the half-split layout of
native/layers/rotary.py: out = x * cos + cat(-x2, x1) * sin.
A negative slot stores nothing (as kv_store.py); padding rows of a captured
batch carry the scratch block's slot, so they write only there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_head(X, W, Cos, Sin, d, partner, sign, ok, eps, QK_NORM: tl.constexpr, DIM: tl.constexpr):
    """The head at X normed (optionally) and rotated, in X's dtype, rounded where the separate kernels round."""
    x = tl.load(X + d, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(X + partner, mask=ok, other=0.0).to(tl.float32)  # the other half's element: cat(x2, x1)[d]
    if QK_NORM:
        scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / DIM + eps)
        w = tl.load(W + d, mask=ok, other=0.0).to(tl.float32)
        wp = tl.load(W + partner, mask=ok, other=0.0).to(tl.float32)
        x = ((x * scale) * w).to(X.dtype.element_ty).to(tl.float32)  # RMSNorm's output, in the model's dtype
        xp = ((xp * scale) * wp).to(X.dtype.element_ty).to(tl.float32)
    c = tl.load(Cos + d, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(Sin + d, mask=ok, other=0.0).to(tl.float32)
    return (x * c + (sign * xp) * s).to(X.dtype.element_ty)


@triton.jit
def _norm_rope_store_kernel(
    Q, K, V, Cos, Sin, QW, KW, QOut, KCache, VCache, Slots,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_kn, stride_ks, stride_kch, stride_vn, stride_vs, stride_vch,
    n_kv, q_eps, k_eps,
    N_HEADS: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    half: tl.constexpr = DIM // 2
    d = tl.arange(0, DIM_PAD)
    ok = d < DIM
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    cos, sin = Cos + token * stride_ct, Sin + token * stride_st

    q = _rope_head(Q + token * stride_qt + head * stride_qh, QW, cos, sin, d, partner, sign, ok, q_eps, QK_NORM, DIM)
    tl.store(QOut + (token * N_HEADS + head) * DIM + d, q, mask=ok)

    slot = tl.load(Slots + token).to(tl.int64)
    kv_head = tl.minimum(head, n_kv - 1)  # programs past the KV heads compute a valid head and store nothing
    stores = ok & ((tl.zeros([DIM_PAD], tl.int64) + head) < n_kv) & ((tl.zeros([DIM_PAD], tl.int64) + slot) >= 0)
    k = _rope_head(K + token * stride_kt + kv_head * stride_kh, KW, cos, sin, d, partner, sign, ok, k_eps, QK_NORM, DIM)
    v = tl.load(V + token * stride_vt + kv_head * stride_vh + d, mask=ok)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    tl.store(KCache + block * stride_kn + offset * stride_ks + kv_head * stride_kch + d,
             k.to(KCache.dtype.element_ty), mask=stores)
    tl.store(VCache + block * stride_vn + offset * stride_vs + kv_head * stride_vch + d,
             v.to(VCache.dtype.element_ty), mask=stores)


def norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    *,
    q_norm: torch.nn.Module | None = None,
    k_norm: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The rotated (and normed) queries; the rotated (and normed) keys and the values go into their cache slots.

    q (T, n_heads, d), k and v (T, n_kv, d): views of the QKV output are fine
    (last dimension contiguous). cos, sin (T, d) in the half-split layout;
    k_cache, v_cache (num_blocks, block_size, n_kv, d); slots (T,) in that
    pool. q_norm and k_norm (both or neither): per-head RMSNorms, anything
    with `.weight` (d,) and `.eps`. Returns a new contiguous (T, n_heads, d).
    """
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together")
    n_tokens, n_heads, dim = q.shape
    n_kv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != n_tokens or n_heads < n_kv or dim % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not make attention heads")
    if k_cache.shape[2:] != (n_kv, dim) or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"a cache of {tuple(k_cache.shape)} (last dimension contiguous) does not hold {n_kv}x{dim}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    out = torch.empty((n_tokens, n_heads, dim), dtype=q.dtype, device=q.device)
    if n_tokens == 0:
        return out
    normed = q_norm is not None
    _norm_rope_store_kernel[(n_tokens, n_heads)](
        q, k, v, cos, sin,
        q_norm.weight if normed else cos, k_norm.weight if normed else cos,  # unread without norms
        out, k_cache, v_cache, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_kv, q_norm.eps if normed else 0.0, k_norm.eps if normed else 0.0,
        N_HEADS=n_heads, DIM=dim, DIM_PAD=triton.next_power_of_2(dim), BLOCK_SIZE=k_cache.shape[1],
        QK_NORM=normed, num_warps=1 if dim <= 128 else 2,
    )
    return out
