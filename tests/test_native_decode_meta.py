"""Decode steps described by tensors alone (the CUDA-graph and kernel path) equal the span path.

The graph path pads block tables with a scratch block and reads lengths from a
tensor; these tests pin that it attends to exactly what the reference path
attends to: ragged lengths, grouped-query heads and sliding windows.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import pytest
import torch

from native.layers.attention import AttentionBatch, DecodeMeta, SeqSpan, paged_attention


@pytest.mark.parametrize("window", [None, 5, 37])
@pytest.mark.parametrize(("n_heads", "n_kv"), [(4, 4), (8, 2), (8, 1)])
def test_decode_meta_path_equals_span_path(window, n_heads, n_kv):
    gen = torch.Generator().manual_seed(0)
    block_size, dim, num_blocks = 4, 16, 64
    scratch = num_blocks  # the pool's extra block, as the runner allocates it
    k_cache = torch.randn(num_blocks + 1, block_size, n_kv, dim, generator=gen)
    v_cache = torch.randn(num_blocks + 1, block_size, n_kv, dim, generator=gen)
    lengths = [1, 7, 16, 30, 53]  # tokens in each sequence's cache including its new one
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    slots = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lengths)]
    b = len(lengths)
    q = torch.randn(b, n_heads, dim, generator=gen)
    k = torch.randn(b, n_kv, dim, generator=gen)
    v = torch.randn(b, n_kv, dim, generator=gen)
    scale = dim**-0.5
    slot_tensor = torch.tensor(slots)

    spans = [SeqSpan(i, 1, n, t) for i, (n, t) in enumerate(zip(lengths, tables))]
    reference = paged_attention(
        q, k, v, k_cache.clone(), v_cache.clone(), AttentionBatch(spans, slot_tensor, block_size, torch.device("cpu")),
        window=window, scale=scale,
    )
    width = 20  # wider than any table, as a graph's fixed width is
    padded = [t + [scratch] * (width - len(t)) for t in tables]
    meta = DecodeMeta(torch.tensor(padded, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32))
    batch = AttentionBatch([], slot_tensor, block_size, torch.device("cpu"), decode_meta=meta)
    got = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), batch, window=window, scale=scale)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
