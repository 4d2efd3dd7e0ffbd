"""Write new tokens' keys and values into their cache slots, in Triton.

One program per new token copies its (n_kv, head_dim) key and value rows to
slot s: block s // block_size, offset s % block_size. A negative slot means
"no slot" (a padding row) and writes nothing. The torch reference does the
same with two index_copy_ calls; this is one launch instead of two, and it
converts to the cache's dtype on the way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kernel(
    K, V, KCache, VCache, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kn, stride_ks, stride_kch,
    stride_vn, stride_vs, stride_vch,
    N_KV: tl.constexpr, KV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(Slots + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, KV_PAD)
    d = tl.arange(0, DIM_PAD)
    h_ok = (h < N_KV) & (tl.zeros([KV_PAD], tl.int64) + slot >= 0)  # a negative slot: nothing to write
    mask = h_ok[:, None] & (d < HEAD_DIM)[None, :]
    row = token.to(tl.int64)
    k = tl.load(K + row * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(V + row * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    k_dst = KCache + block * stride_kn + offset * stride_ks + h[:, None] * stride_kch + d[None, :]
    v_dst = VCache + block * stride_vn + offset * stride_vs + h[:, None] * stride_vch + d[None, :]
    tl.store(k_dst, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v (T, n_kv, d) -> k_cache, v_cache (num_blocks, block_size, n_kv, d) at `slots` (T,)."""
    n_tokens, n_kv, dim = k.shape
    if n_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the cache's last dimension must be contiguous")
    _store_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        N_KV=n_kv, KV_PAD=max(2, triton.next_power_of_2(n_kv)),
        HEAD_DIM=dim, DIM_PAD=triton.next_power_of_2(dim),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=1 if n_kv * dim <= 512 else 4,
    )
