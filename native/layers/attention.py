"""Attention over the paged KV cache: the torch reference path, and the seam for kernels.

The cache of one layer is two tensors of shape (num_blocks, block_size,
n_kv_heads, head_dim): K and V are kept with the model's own KV head count,
never repeated for grouped-query attention. A sequence owns a list of blocks
(its block table); token t of it lives in block table[t // block_size] at
offset t % block_size, and its "slot" is block * block_size + offset.

One step of the engine runs a flat batch of T new tokens from many sequences:
single tokens of sequences that are decoding and chunks of prompts being
prefilled. `AttentionBatch` says which tokens belong to whom. Every layer:
1. writes the new K and V into their slots (`store_kv`);
2. computes attention for each sequence over the cache (`paged_attention`).

The reference path gathers a sequence's blocks into a contiguous key range and
calls `scaled_dot_product_attention`. Grouped-query attention is done by
folding: the G query heads that share a KV head become G rows of one query
matrix against that head's keys, so no K/V copy per query head is made.
Sliding windows (key j visible from query i iff i - window < j <= i) only
gather the blocks the window can reach. Decoding sequences are batched into
one call per layer, padded to the longest and masked.

A GPU kernel replaces `paged_attention` (and `store_kv`) with the same
arguments. On CUDA, where Triton imports, the decode rows of a step run the
Triton kernels of native/kernels/ (steps described by a `DecodeMeta`
entirely, the decode rows of mixed steps too); prompt chunks and the CPU
keep the torch path.
LOCALLLM_NATIVE_ATTENTION=reference switches the kernels off;
LOCALLLM_NATIVE_ATTENTION=triton forces them on any device (on a CPU that
works only under Triton's interpreter, TRITON_INTERPRET=1: for tests).

When the kernels run a `DecodeMeta` step, the layer does not call
`paged_attention`: one kernel norms (Qwen3, Gemma 3) and rotates q and k
and stores k and v (kernels.norm_rope_store, picked by
`fused_decode_kernels`), and `attend_stored` then reads the cache as it is.
LOCALLLM_NATIVE_FUSED=off turns that off, and the residual add + norm
kernel with it (see native/kernels/__init__.py): the same ops then run as
separate kernels (default: on).

Sliding-window layers may keep their own pool (see localllm/core/kv_sizing.py): then
each span and decode description carries a second block table, and those
layers store and read through it. Blocks that left the window are -1 in that
table; nothing here reads a position the window cannot reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SeqSpan:
    """One sequence's part of a step."""

    q_start: int  # index of its first new token in the flat batch
    q_len: int  # how many new tokens it runs this step
    ctx_len: int  # tokens in its cache once this step's are written (its last position + 1)
    block_table: list[int]
    sliding_table: list[int] | None = None  # the sliding layers' table, when they have their own pool

    def table(self, window: int | None) -> list[int]:
        return self.block_table if window is None or self.sliding_table is None else self.sliding_table


class Workspace:
    """Reusable buffers for gathered keys and values.

    A fresh tensor of tens of MB per layer and step costs more than the copy
    into it (on the CPU, new pages fault in one by one: a 16-sequence gather
    took ~6 ms allocating and ~0.8 ms into a reused buffer). Buffers only grow.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = 1
        for dim in shape:
            n *= dim
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:n].view(shape)


def gather_blocks(cache: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy whole blocks `ids` (any shape) of a layer's cache into `out`: (*ids.shape, block_size, n_kv, d)."""
    flat = cache.view(cache.shape[0], -1)
    torch.index_select(flat, 0, ids.reshape(-1), out=out.view(ids.numel(), -1))
    return out


@dataclass
class DecodeMeta:
    """A decode-only step described by tensors alone, for the GPU kernels and CUDA graphs.

    Row i of the flat batch is one new token of one sequence. Its keys are
    positions 0..context_lens[i]-1, found through block_tables[i] (padded with
    any valid block id past the sequence's last block). Nothing here is a
    Python list, so a captured CUDA graph can replay a step with new values.
    """

    block_tables: torch.Tensor  # (B, max_blocks) int32
    context_lens: torch.Tensor  # (B,) int32: tokens in the cache including the new one
    sliding_block_tables: torch.Tensor | None = None  # (B, max_blocks) int32: the sliding layers' own pool

    def tables(self, window: int | None) -> torch.Tensor:
        if window is None or self.sliding_block_tables is None:
            return self.block_tables
        return self.sliding_block_tables


@dataclass
class AttentionBatch:
    spans: list[SeqSpan]
    slot_mapping: torch.Tensor  # (T,) int64: the cache slot of each new token
    block_size: int
    device: torch.device
    workspace: Workspace = field(default_factory=Workspace)
    decode_meta: DecodeMeta | None = None  # set when every row decodes and the decode kernel runs
    sliding_slot_mapping: torch.Tensor | None = None  # (T,) the slots in the sliding layers' own pool
    _decode_views: dict = field(default_factory=dict)  # window -> (rows, table, mask), shared by layers
    _kernel_views: dict = field(default_factory=dict)  # window -> (rows, block tables, lengths) for the kernel
    _prefill_views: dict = field(default_factory=dict)  # (span, window) -> (block ids, key offset, mask)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())

    def slots(self, window: int | None) -> torch.Tensor:
        """Where a layer with this window stores the new tokens (its group's pool)."""
        if window is None or self.sliding_slot_mapping is None:
            return self.slot_mapping
        return self.sliding_slot_mapping

    def kernel_view(self, window: int | None):
        """The one-token spans as the decode kernel wants them: rows, whole block tables, lengths."""
        key = window is not None and self.sliding_slot_mapping is not None
        if key not in self._kernel_views:
            decoding = [s for s in self.spans if s.q_len == 1]
            view = None
            if decoding:
                tables = [s.table(window) for s in decoding]
                width = max(map(len, tables))
                padded = [t + [t[-1]] * (width - len(t)) for t in tables]
                dev = self.device
                view = (
                    torch.tensor([s.q_start for s in decoding], dtype=torch.int64, device=dev),
                    torch.tensor(padded, dtype=torch.int32, device=dev),
                    torch.tensor([s.ctx_len for s in decoding], dtype=torch.int32, device=dev),
                )
            self._kernel_views[key] = view
        return self._kernel_views[key]

    def decode_view(self, window: int | None):
        """Batched one-token sequences: rows in the flat batch, padded block tables, key mask."""
        if window not in self._decode_views:
            self._decode_views[window] = self._build_decode_view(window)
        return self._decode_views[window]

    def _build_decode_view(self, window: int | None):
        bs = self.block_size
        rows, tables, firsts, lens, starts = [], [], [], [], []
        for span in self.spans:
            if span.q_len != 1:
                continue
            first_pos = 0 if window is None else max(0, span.ctx_len - window)
            first_block = first_pos // bs
            last_block = (span.ctx_len - 1) // bs
            rows.append(span.q_start)
            tables.append(span.table(window)[first_block : last_block + 1])
            starts.append(first_block * bs)
            firsts.append(first_pos)
            lens.append(span.ctx_len)
        if not rows:
            return None
        width = max(len(t) for t in tables)
        padded = [t + [t[0]] * (width - len(t)) for t in tables]
        table = torch.tensor(padded, dtype=torch.int64, device=self.device)
        pos = torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(width * bs, device=self.device)
        first = torch.tensor(firsts, device=self.device).unsqueeze(1)
        end = torch.tensor(lens, device=self.device).unsqueeze(1)
        mask = ((pos >= first) & (pos < end))[:, None, None, :]  # (B, 1, 1, L)
        return torch.tensor(rows, dtype=torch.int64, device=self.device), table, mask

    def prefill_view(self, index: int, window: int | None):
        key = (index, window)
        if key not in self._prefill_views:
            self._prefill_views[key] = self._build_prefill_view(self.spans[index], window)
        return self._prefill_views[key]

    def _build_prefill_view(self, span: SeqSpan, window: int | None):
        """Which cached keys a prompt chunk sees, and the mask of query rows against them.

        Returns (block ids or None, offset of the first key inside the gathered
        blocks, boolean mask (q_len, n_keys)). None means "the chunk's own keys
        are all it needs" (a prompt with nothing cached before it).
        """
        bs = self.block_size
        first_q = span.ctx_len - span.q_len
        first_pos = 0 if window is None else max(0, first_q - window + 1)
        q_pos = torch.arange(first_q, span.ctx_len, device=self.device).unsqueeze(1)
        k_pos = torch.arange(first_pos, span.ctx_len, device=self.device).unsqueeze(0)
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        if first_q == 0:
            return None, 0, mask
        first_block = first_pos // bs
        last_block = (span.ctx_len - 1) // bs
        ids = torch.tensor(span.table(window)[first_block : last_block + 1], dtype=torch.int64, device=self.device)
        return ids, first_pos - first_block * bs, mask


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Write the new tokens' K and V (T, n_kv_heads, head_dim) into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    *,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """q (T, n_heads, d), k and v (T, n_kv_heads, d) of the new tokens -> output (T, n_heads * d).

    Stores k and v first, so every query sees its own token.
    """
    kernels = _kernels(q)
    slots = batch.slots(window)
    if batch.decode_meta is not None:
        meta = batch.decode_meta
        if kernels is not None:
            kernels.store_kv(k, v, k_cache, v_cache, slots)
            return attend_stored(q, k_cache, v_cache, batch, window=window, scale=scale)
        store_kv(k, v, k_cache, v_cache, slots)
        return decode_attention(q, k_cache, v_cache, meta, window=window, scale=scale).view(q.shape[0], -1)
    (kernels.store_kv if kernels is not None else store_kv)(k, v, k_cache, v_cache, slots)
    n_tokens, n_heads, dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    out = torch.empty(n_tokens, n_heads, dim, dtype=q.dtype, device=q.device)

    view = batch.kernel_view(window) if kernels is not None else None
    if view is not None:
        rows, tables, lengths = view
        o = kernels.paged_decode_attention(q.index_select(0, rows), k_cache, v_cache, tables, lengths, window=window, scale=scale)
        out.index_copy_(0, rows, o)
    decode = batch.decode_view(window) if kernels is None else None
    if decode is not None:
        rows, table, mask = decode
        b, width = table.shape
        shape = (b, width, k_cache.shape[1], n_kv, dim)
        keys = gather_blocks(k_cache, table, batch.workspace.get("k", shape, k_cache))
        values = gather_blocks(v_cache, table, batch.workspace.get("v", shape, v_cache))
        keys = keys.view(b, -1, n_kv, dim).transpose(1, 2)  # (B, n_kv, L, d)
        values = values.view(b, -1, n_kv, dim).transpose(1, 2)
        queries = q.index_select(0, rows).view(b, n_kv, group, dim)  # G query heads as G rows
        o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        out.index_copy_(0, rows, o.reshape(b, n_heads, dim))

    for i, span in enumerate(batch.spans):
        if span.q_len == 1:
            continue
        ids, offset, mask = batch.prefill_view(i, window)
        n_keys = mask.shape[1]
        sl = slice(span.q_start, span.q_start + span.q_len)
        if ids is None:
            keys, values = k[sl], v[sl]
        else:
            shape = (ids.numel(), k_cache.shape[1], n_kv, dim)
            keys = gather_blocks(k_cache, ids, batch.workspace.get("k", shape, k_cache))
            values = gather_blocks(v_cache, ids, batch.workspace.get("v", shape, v_cache))
            keys = keys.view(-1, n_kv, dim)[offset : offset + n_keys]
            values = values.view(-1, n_kv, dim)[offset : offset + n_keys]
        n = span.q_len
        # (n, n_heads, d) -> (1, n_kv, G*n, d): row g*n + i is query head kv*G + g at token i
        queries = q[sl].view(n, n_kv, group, dim).permute(1, 2, 0, 3).reshape(1, n_kv, group * n, dim)
        keys = keys.to(q.dtype).transpose(0, 1).unsqueeze(0)  # (1, n_kv, L, d)
        values = values.to(q.dtype).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.repeat(group, 1), scale=scale)
        out[sl] = o.view(n_kv, group, n, dim).permute(2, 0, 1, 3).reshape(n, n_heads, dim)
    return out.view(n_tokens, n_heads * dim)


def fused_decode_kernels(q: torch.Tensor, batch: AttentionBatch):
    """native.kernels when this step's new K and V are stored by the kernel that also norms and rotates them.

    That is a step described by a DecodeMeta whose attention runs the decode
    kernel (CUDA, or forced), unless LOCALLLM_NATIVE_FUSED=off. Decided from
    the batch's kind and the environment alone, so a captured step keeps it.
    """
    if batch.decode_meta is None:
        return None
    kernels = _kernels(q)
    return kernels if kernels is not None and kernels.fusions_on() else None


def attend_stored(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, *,
                  window: int | None, scale: float) -> torch.Tensor:
    """Attention of a DecodeMeta step whose new K and V are in the cache already: (B, n_heads, d) -> (B, n_heads * d)."""
    from .. import kernels

    meta = batch.decode_meta
    out = kernels.paged_decode_attention(q, k_cache, v_cache, meta.tables(window), meta.context_lens,
                                         window=window, scale=scale)
    return out.view(q.shape[0], -1)


def _kernels(q: torch.Tensor):
    """native.kernels when the decode rows should run there, else None (see the module docstring)."""
    from .. import kernels

    choice = kernels.attention_choice()
    if choice == "reference" or (choice != "triton" and not q.is_cuda):
        return None

    return kernels if kernels.triton_importable() else None


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta, *, window: int | None, scale: float
) -> torch.Tensor:
    """One new token per row, keys found through `meta` alone: (B, n_heads, d) -> (B, n_heads, d).

    The GPU kernel's contract, written in torch: it reads every block of the
    padded tables and masks by length, so it is slow for long contexts, but it
    needs no Python list and can be captured in a CUDA graph.
    """
    b, n_heads, dim = q.shape
    n_kv, bs = k_cache.shape[2], k_cache.shape[1]
    width = meta.block_tables.shape[1]
    ids = meta.tables(window).long()
    keys = k_cache[ids].view(b, width * bs, n_kv, dim).transpose(1, 2)  # (B, n_kv, L, d)
    values = v_cache[ids].view(b, width * bs, n_kv, dim).transpose(1, 2)
    pos = torch.arange(width * bs, device=q.device).unsqueeze(0)
    end = meta.context_lens.long().unsqueeze(1)
    visible = pos < end
    if window is not None:
        visible &= pos > end - 1 - window
    queries = q.view(b, n_kv, n_heads // n_kv, dim)
    o = F.scaled_dot_product_attention(queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible[:, None, None, :], scale=scale)
    return o.reshape(b, n_heads, dim)
