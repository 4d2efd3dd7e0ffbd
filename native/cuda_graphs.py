"""CUDA graphs for decode steps: one captured forward pass per batch size.

Decoding a small model on a big GPU is bound by kernel launches, not by the
GPU: a 16-layer model issues a few hundred kernels per token, and launching
each costs the CPU several microseconds, longer than the GPU needs to run it.
A CUDA graph records those launches once and replays them with one call.

What makes a decode step replayable:
- every input lives in a fixed buffer: token ids, positions, cache slots,
  block tables (padded to the longest context) and context lengths;
- attention runs the paged-decode kernel, which reads lengths and block tables
  from tensors rather than from Python lists (`DecodeMeta`);
- the batch is padded up to the next captured size. Padding rows decode a
  dummy token into a spare block that no sequence owns, so they never touch a
  real sequence's keys and values.
When sliding-window layers keep a pool of their own (localllm/core/kv_sizing.py), a second
block table and a second row of slots travel the same way.

Only steps in which every sequence decodes one token replay a graph; steps
carrying prompt chunks run eagerly, as on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.attention import AttentionBatch, DecodeMeta


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to `max_batch` (the padding waste stays under 8 rows)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(8 if max_batch > 8 else max_batch, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    """Graphs for decode batches of up to `max_batch` sequences, sharing one memory pool."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        scratch_blocks: list[int],
        device: torch.device,
    ) -> None:
        self.sizes = capture_sizes(max_batch)
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_blocks = scratch_blocks  # one per KV group
        self.groups = len(scratch_blocks)
        self.device = device
        # rows of one host buffer, copied to the device in one transfer:
        # ids, positions, slots, lengths, and the sliding pool's slots
        self._host_rows = torch.zeros(5, max_batch, dtype=torch.int64).pin_memory()
        self._host_tables = torch.zeros(self.groups, max_batch, max_blocks, dtype=torch.int32).pin_memory()
        self._rows = torch.zeros(5, max_batch, dtype=torch.int64, device=device)
        self._tables = torch.zeros(self.groups, max_batch, max_blocks, dtype=torch.int32, device=device)
        self._lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self._clear_padding(0, max_batch)
        self._upload(max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture(model)

    # -- capture -------------------------------------------------------------------------
    def _batch(self, size: int) -> AttentionBatch:
        meta = DecodeMeta(block_tables=self._tables[0, :size], context_lens=self._lens[:size])
        batch = AttentionBatch([], self._rows[2, :size], self.block_size, self.device, decode_meta=meta)
        if self.groups > 1:
            meta.sliding_block_tables = self._tables[1, :size]
            batch.sliding_slot_mapping = self._rows[4, :size]
        return batch

    @torch.inference_mode()
    def _capture(self, model: nn.Module) -> None:
        pool = None
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            batch = self._batch(size)
            ids, positions = self._rows[0, :size], self._rows[1, :size]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: kernels compile and the allocator settles outside the graph
                    model(ids, positions, batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = model(ids, positions, batch)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    # -- replay --------------------------------------------------------------------------
    def fits(self, n_seqs: int, longest_table: int) -> bool:
        return n_seqs <= self.sizes[-1] and longest_table <= self.max_blocks

    @torch.inference_mode()
    def run(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[list[int]],
        tables: list[list[list[int]]],
    ) -> torch.Tensor:
        """Hidden states (n, hidden) for n decoding sequences; row i belongs to ids[i].

        slots[g][i] and tables[g][i] are sequence i's new slot and block table in KV group g.
        """
        n = len(ids)
        size = next(s for s in self.sizes if s >= n)
        rows, host_tables = self._host_rows, self._host_tables
        rows[0, :n] = torch.tensor(ids)
        rows[1, :n] = torch.tensor(positions)
        rows[2, :n] = torch.tensor(slots[0])
        rows[3, :n] = rows[1, :n] + 1  # each sequence's context length once its new token is stored
        if self.groups > 1:
            rows[4, :n] = torch.tensor(slots[1])
        for g in range(self.groups):
            host_tables[g, :n].fill_(self.scratch_blocks[g])
            for i, table in enumerate(tables[g]):
                host_tables[g, i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        self._clear_padding(n, size)
        self._upload(size)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _clear_padding(self, start: int, end: int) -> None:
        """Rows start..end decode token 0 at position 0 into the scratch block."""
        if start >= end:
            return
        self._host_rows[:, start:end] = 0
        self._host_rows[2, start:end] = self.scratch_blocks[0] * self.block_size
        self._host_rows[3, start:end] = 1
        self._host_rows[4, start:end] = self.scratch_blocks[-1] * self.block_size
        for g in range(self.groups):
            self._host_tables[g, start:end] = self.scratch_blocks[g]

    def _upload(self, size: int) -> None:
        self._rows[:, :size].copy_(self._host_rows[:, :size], non_blocking=True)
        self._tables[:, :size].copy_(self._host_tables[:, :size], non_blocking=True)
        self._lens[:size].copy_(self._host_rows[3, :size], non_blocking=True)
