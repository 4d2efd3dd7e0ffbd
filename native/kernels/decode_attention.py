"""Paged decode attention in Triton: one new token per sequence against its cached keys.

Each program handles one sequence and one KV head, and with it the G query
heads that share that head (grouped-query attention): the G queries are the
rows of one small matrix, so every key and value row is read from memory once
for all of them. Keys are visited in tiles of TILE positions; a tile's slots
are found through the sequence's block table (token t lives in block
table[t // block_size] at offset t % block_size), and an online softmax
(running maximum, running sum, rescaled accumulator) folds tile after tile, so
no score vector as long as the context is ever stored.

Sliding windows: a sequence with `ctx_len` tokens (its new one included) sees
positions ctx_len - window .. ctx_len - 1. Tiles before the window are never
visited, so table entries there may be anything (the block manager marks
blocks that left the window with -1).

Split-K ("flash decoding"): with few sequences there are too few programs to
keep a GPU busy (one sequence x 8 KV heads is 8 programs for 132 SMs), so the
tiles of a sequence can be split among NUM_SPLITS programs, each writing a
partial maximum, sum and accumulator; a second small kernel merges them.

Shapes obey what Triton compiles on GPUs: every block dimension is a power of
two, and tl.dot needs at least 16 rows, so the query group is padded to 16
(the extra rows are zeros whose results are dropped) and head dims to a power
of two (masked). Scores and the accumulator are float32; float32 caches use
IEEE products (not TF32) so results match the float32 reference.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    Q, K, V, Tables, Lens, Out, PartM, PartL, PartO,
    qk_scale, window,
    stride_qb, stride_qh,
    stride_kn, stride_kt, stride_kh,
    stride_vn, stride_vt, stride_vh,
    stride_tb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(Lens + seq)
    start = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    first_tile = start // TILE
    end_tile = (ctx + TILE - 1) // TILE
    per_split = (end_tile - first_tile + NUM_SPLITS - 1) // NUM_SPLITS
    lo = first_tile + split * per_split
    hi = tl.minimum(lo + per_split, end_tile)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        Q + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    t = tl.arange(0, TILE)
    table = Tables + seq.to(tl.int64) * stride_tb
    for tile in range(lo, hi):
        pos = tile * TILE + t
        ok = (pos >= start) & (pos < ctx)
        block = tl.load(table + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        offset = (pos % BLOCK_SIZE).to(tl.int64)
        k_rows = K + block * stride_kn + offset * stride_kt + kv_head * stride_kh
        k = tl.load(k_rows[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (GROUP_PAD, TILE), log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v_rows = V + block * stride_vn + offset * stride_vt + kv_head * stride_vh
        v = tl.load(v_rows[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    if NUM_SPLITS == 1:
        out = acc / l[:, None]
        tl.store(
            Out + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )
    else:
        part = (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * NUM_SPLITS + split
        tl.store(PartM + part * GROUP_PAD + g, m)
        tl.store(PartL + part * GROUP_PAD + g, l)
        tl.store(PartO + (part * GROUP_PAD + g[:, None]) * DIM_PAD + d[None, :], acc)


@triton.jit
def _merge_kernel(
    PartM, PartL, PartO, Out,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Fold the splits' partial softmax states into the output (splits past the context are empty)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    first = (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * NUM_SPLITS
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for s in range(NUM_SPLITS):
        part = first + s
        m_s = tl.load(PartM + part * GROUP_PAD + g)
        l_s = tl.load(PartL + part * GROUP_PAD + g)
        acc_s = tl.load(PartO + (part * GROUP_PAD + g[:, None]) * DIM_PAD + d[None, :])
        m_new = tl.maximum(m, m_s)
        has_old = m > float("-inf")
        has_new = m_s > float("-inf")
        a = tl.where(has_old, tl.exp2(m - m_new), 0.0)
        b = tl.where(has_new, tl.exp2(m_s - m_new), 0.0)
        l = l * a + l_s * b
        acc = acc * a[:, None] + acc_s * b[:, None]
        m = m_new
    heads = kv_head * GROUP + g
    tl.store(
        Out + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
        (acc / l[:, None]).to(Out.dtype.element_ty),
        mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :],
    )


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_splits(batch: int, n_kv: int, max_context: int, device: torch.device) -> int:
    """How many programs share one sequence's keys: enough programs for about two waves of the GPU.

    Depends only on the batch size and the table width, so a CUDA graph
    captured for a batch size keeps a valid choice when lengths change.
    """
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    programs = batch * n_kv
    if programs >= sms:
        return 1
    want = -(-2 * sms // programs)
    tiles = max(1, max_context // 64)
    splits = 1
    while splits < want and splits < 16 and splits * 2 <= tiles:
        splits *= 2
    return splits


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    window: int | None,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, n_heads, d) -> (B, n_heads, d): row b attends to positions of sequence b through its table.

    k_cache, v_cache: (num_blocks, block_size, n_kv, d); block_tables (B, W) int32
    indexed by position // block_size; context_lens (B,) int32, each >= 1.
    """
    b, n_heads, dim = q.shape
    _, block_size, n_kv, cache_dim = k_cache.shape
    if cache_dim != dim or n_heads % n_kv:
        raise ValueError(f"query heads {n_heads}x{dim} do not fit a cache of {n_kv}x{cache_dim}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the cache's last dimension must be contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    group = n_heads // n_kv
    group_pad = max(16, triton.next_power_of_2(group))
    dim_pad = max(16, triton.next_power_of_2(dim))
    tile = 64 if dim_pad <= 128 else 32
    if num_splits is None:
        num_splits = default_splits(b, n_kv, block_tables.shape[1] * block_size, q.device)
    if num_splits & (num_splits - 1):
        raise ValueError("num_splits must be a power of two")
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    if num_splits > 1:
        parts = b * n_kv * num_splits * group_pad
        part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_o = torch.empty(parts * dim_pad, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_o = out  # unused
    _decode_kernel[(b, n_kv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_m, part_l, part_o,
        scale * LOG2E, window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim, DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size, TILE=tile, NUM_SPLITS=num_splits, PRECISION=precision,
        num_warps=4,
    )
    if num_splits > 1:
        _merge_kernel[(b, n_kv)](
            part_m, part_l, part_o, out,
            out.stride(0), out.stride(1),
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim, DIM_PAD=dim_pad, NUM_SPLITS=num_splits,
            num_warps=4,
        )
    return out
