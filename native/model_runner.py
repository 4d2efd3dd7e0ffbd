"""The model, its KV cache, and turning a scheduled step into one forward pass.

The runner owns the device side: it loads the weights, sizes and allocates
the block pool, lays a step's tokens out as one flat batch (token ids,
positions, cache slots, per-sequence spans), runs the model, and computes
logits only for the rows that sample.

Sizing the pool:
- CPU: from a RAM budget (an option; by default a quarter of the memory
  available now, but no more than max_num_seqs full contexts need). CPU pages
  are only touched when written, so an unused pool costs address space, not RAM.
- CUDA: from measured memory. A profiling pass runs the largest step the
  scheduler can produce with a minimal cache, measures the activation peak,
  and gives the cache what is left of `gpu_memory_utilization` of the device.
When contexts can outgrow a sliding window, the sliding layers get a pool of
their own (a second KV group, see localllm/core/kv_sizing.py) and the budget is split
between the pools; each pool has its own scratch block.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from localllm.core.context_checks import context_size
from localllm.core.errors import BadRequest

from localllm.core.model_config import ModelConfig
from localllm.core.kv_sizing import KVGroup, demand_bytes, group_block_bytes, kv_groups, split_budget
from .layers.attention import AttentionBatch, DecodeMeta, SeqSpan, Workspace
from .loader import LoadedWeights, load_weights, resolve_precision
from .models import build_model
from .scheduler import Scheduled

CPU_DEFAULT_RAM_SHARE = 0.25


@dataclass
class RunnerOptions:
    device: str = "cpu"
    dtype: torch.dtype | None = torch.float32  # compute dtype; None: the one `weights` implies
    weights: str = "auto"  # how linear weights are stored (loader.WEIGHT_FORMATS); "auto" is resolved at load
    block_size: int = 16
    n_ctx: int = 0  # 0: min(DEFAULT_CONTEXT, the model's trained context)
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    kv_cache_bytes: int | None = None  # CPU: the budget; CUDA: at most this; None: the default policy above
    gpu_memory_utilization: float = 0.90
    pack_output: bool = True  # CPU: reorder the output projection for oneDNN (faster; a second copy if tied)
    cuda_graphs: bool = True  # CUDA: replay captured graphs for decode steps (needs the decode kernel)
    max_logit_rows: int = 0  # most rows a step computes logits for (speculation checks k + 1 a sequence); 0: max_num_seqs


class ModelRunner:
    def __init__(self, model_path: Path | LoadedWeights, options: RunnerOptions) -> None:
        """`model_path` is a file or folder, or weights already in memory (random-weight benchmarks)."""
        self.options = options
        self.device = torch.device(options.device)
        self.block_size = options.block_size
        loaded = model_path if isinstance(model_path, LoadedWeights) else load_weights(model_path)  # headers only
        self.config: ModelConfig = loaded.config
        self.weights, self.dtype = resolve_precision(options.weights, options.dtype, self.device, loaded.tensors)
        options.weights, options.dtype = self.weights, self.dtype
        options.n_ctx = context_size(options.n_ctx, self.config.max_position)
        self.dtype_bytes = torch.tensor([], dtype=self.dtype).element_size()
        self.kv_groups: list[KVGroup] = kv_groups(self.config, options.n_ctx, self.block_size)
        self.workspace = Workspace()  # gather buffers, reused by every layer and step
        on_cpu = self.device.type == "cpu"
        if on_cpu:  # a budget that cannot hold one context fails before seconds of loading
            self.num_blocks = self._plan_blocks()
        self.weights_source = loaded.source
        self.model = build_model(self.config)
        self.model.load_weights(loaded.tensors, self.dtype, self.device, self.weights)  # streamed, a slice at a time
        loaded.tensors.close()
        self.model.eval()
        if on_cpu and options.pack_output:
            self.model.pack_output_for_cpu(options.max_num_seqs)
        self.decode_kernel = not on_cpu and decode_kernel_available()
        if self.decode_kernel:
            self._verify_fusions()
        if not on_cpu:  # measured, so only now
            self.num_blocks = self._plan_blocks()
        self._allocate_cache()
        self.graphs = None
        if self.decode_kernel and options.cuda_graphs:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model,
                max_batch=options.max_num_seqs,
                max_blocks=self.blocks_for_tokens(options.n_ctx),
                block_size=self.block_size,
                scratch_blocks=self.scratch_blocks,
                device=self.device,
            )

    # -- the pool --------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        """Bytes of one block of the first group (of every layer, unless sliding layers have their own pool)."""
        return self.group_block_bytes[0]

    @property
    def group_block_bytes(self) -> list[int]:
        return [group_block_bytes(g, self.config, self.block_size, self.dtype_bytes) for g in self.kv_groups]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(g.num_blocks * b for g, b in zip(self.kv_groups, self.group_block_bytes))

    def _plan_blocks(self) -> int:
        """Blocks of every KV group (set on self.kv_groups); returns the first group's."""
        o = self.options
        shape = dict(
            block_size=self.block_size,
            n_ctx=o.n_ctx,
            max_num_seqs=o.max_num_seqs,
            max_num_batched_tokens=o.max_num_batched_tokens,
        )
        sizes = self.group_block_bytes
        if self.device.type == "cuda":  # what is free, or less when a budget is given (a plan, a shared GPU)
            budget = self._cuda_budget()
            if o.kv_cache_bytes is not None:
                budget = min(budget, o.kv_cache_bytes)
        elif o.kv_cache_bytes is not None:
            budget = o.kv_cache_bytes
        else:
            budget = min(int(_available_ram() * CPU_DEFAULT_RAM_SHARE), demand_bytes(self.kv_groups, sizes, **shape))
        counts = split_budget(self.kv_groups, budget, sizes, **shape)
        for group, count in zip(self.kv_groups, counts):
            group.num_blocks = count
        return counts[0]

    def _allocate_cache(self, num_blocks: int | None = None) -> None:
        """The pools, one per KV group. On CPU zeroed block by block as blocks are first used (_zero_new_blocks).

        `num_blocks` gives every group that many (the profiling pass); None, the planned counts.
        One block more than the block manager hands out: the scratch block,
        which padding rows of a CUDA-graph decode batch write into.
        """
        c = self.config
        counts = [g.num_blocks if num_blocks is None else num_blocks for g in self.kv_groups]
        self.scratch_block = counts[0]
        self.scratch_blocks = counts
        self.kv_caches: list[torch.Tensor] = []
        layers = self.model.attention_layers()
        for group, count in zip(self.kv_groups, counts):
            shape = (2, len(group.layers), count + 1, self.block_size, c.n_kv_heads, c.head_dim)
            make = torch.empty if self.device.type == "cpu" else torch.zeros
            cache = make(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append(cache)
            for j, layer in enumerate(group.layers):
                layers[layer].k_cache, layers[layer].v_cache = cache[0, j], cache[1, j]
        self.kv_cache = self.kv_caches[0]
        self._zeroed_blocks = [0 if self.device.type == "cpu" else n + 1 for n in counts]

    def _cuda_budget(self) -> int:
        """Bytes for the cache: what the largest step leaves of the allowed share of the device."""
        o = self.options
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n_tokens = min(o.max_num_batched_tokens, o.n_ctx)
        self._allocate_cache(self.blocks_for_tokens(n_tokens))
        self._profile_step(n_tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_cache = None
        self.kv_caches = []
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = None
        torch.cuda.empty_cache()
        current = torch.cuda.memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_elsewhere = total - free - current  # other processes, the CUDA context, the allocator's slack
        # The reference attention gathers a decode batch's keys and values into a workspace:
        # at worst every sequence at full length, one layer at a time. The decode kernel reads
        # the cache in place; then only a prompt chunk over a cached prefix gathers (one context).
        c = self.config
        gathered_seqs = 1 if self.decode_kernel else o.max_num_seqs
        gather = 2 * gathered_seqs * o.n_ctx * c.n_kv_heads * c.head_dim * self.dtype_bytes
        scratch = sum(self.group_block_bytes)
        return int(total * o.gpu_memory_utilization - used_elsewhere - peak - gather - scratch)

    def _verify_fusions(self) -> None:
        """The fused kernels, checked once at this model's shapes; the separate ones if they fail (one line on stderr)."""
        from .kernel_check import verify_fusions

        failed = verify_fusions(self.config, self.dtype, self.device)
        if failed:
            sys.stderr.write(f"localllm: fused GPU kernels are off ({failed}); the separate kernels run instead\n")

    def blocks_for_tokens(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @torch.inference_mode()
    def _profile_step(self, n_tokens: int) -> None:
        """One prompt chunk of `n_tokens` plus logits for the most rows a step samples from."""
        table = list(range(self.blocks_for_tokens(n_tokens)))
        span = SeqSpan(0, n_tokens, n_tokens, table)
        slots = torch.arange(n_tokens, device=self.device)
        batch = AttentionBatch([span], slots, self.block_size, self.device)
        ids = torch.zeros(n_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, torch.arange(n_tokens, device=self.device), batch)
        rows = self.options.max_logit_rows or self.options.max_num_seqs
        self.model.compute_logits(hidden[:rows] if rows <= n_tokens else hidden.new_zeros(rows, hidden.shape[-1]))

    # -- a step ----------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, step: list[Scheduled], *, logit_rows: list[int] | None = None) -> torch.Tensor:
        """Run a step. Returns float32 logits of the sampling rows, in step order.

        `logit_rows` asks for the logits of those rows of the flat batch instead
        (scoring and tests).
        """
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[SeqSpan] = []
        sample_rows: list[int] = []
        grouped = len(self.kv_groups) > 1  # sliding layers have their own pool and table
        sliding_slots: list[int] = []
        for item in step:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.n_tokens
            if end > self.options.n_ctx:
                raise BadRequest(f"sequence {seq.request_id} would pass the context of {self.options.n_ctx}")
            sliding = seq.block_tables[1] if grouped else None
            spans.append(SeqSpan(len(ids), item.n_tokens, end, seq.block_table, sliding))
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if sliding is not None:
                sliding_slots.extend(sliding[p // bs] * bs + p % bs for p in range(start, end))
            if item.samples:
                sample_rows.append(len(ids) - 1)
        for g in range(len(self.kv_groups)):
            self._zero_new_blocks(max(max(item.seq.block_tables[g]) for item in step), g)
        dev = self.device
        decode_only = self.decode_kernel and len(ids) == len(step)  # one new token per sequence
        tables = [item.seq.block_table for item in step]
        if decode_only and self.graphs is not None and self.graphs.fits(len(ids), max(map(len, tables))):
            group_tables = [[item.seq.block_tables[g] for item in step] for g in range(len(self.kv_groups))]
            hidden = self.graphs.run(ids, positions, [slots, sliding_slots], group_tables)
        else:
            meta = self._decode_meta(tables, positions) if decode_only else None
            if meta is not None and grouped:
                meta.sliding_block_tables = self._decode_meta([s.sliding_table for s in spans], positions, 1).block_tables
            batch = AttentionBatch(
                spans, torch.tensor(slots, dtype=torch.int64, device=dev), bs, dev, self.workspace, decode_meta=meta
            )
            if grouped:
                batch.sliding_slot_mapping = torch.tensor(sliding_slots, dtype=torch.int64, device=dev)
            hidden = self.model(
                torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(positions, dtype=torch.int64, device=dev), batch
            )
        rows = sample_rows if logit_rows is None else logit_rows
        if not rows:
            return torch.empty(0, self.config.vocab_size, device=dev)
        if rows == list(range(hidden.shape[0])):
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])

    def _decode_meta(self, tables: list[list[int]], positions: list[int], group: int = 0) -> DecodeMeta:
        width = max(map(len, tables))
        padded = [t + [self.scratch_blocks[group]] * (width - len(t)) for t in tables]
        return DecodeMeta(
            block_tables=torch.tensor(padded, dtype=torch.int32, device=self.device),
            context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=self.device),
        )


    def _zero_new_blocks(self, highest: int, group: int = 0) -> None:
        """Zero blocks up to `highest` (of the group's pool) that no step has touched yet.

        Attention reads whole blocks and masks the slots past a sequence's end;
        those must hold finite numbers (0 x NaN is NaN), and uninitialised memory
        may not. Zeroing on first use keeps the promise without making the whole
        pool resident in RAM up front.
        """
        if highest >= self._zeroed_blocks[group]:
            self.kv_caches[group][:, :, self._zeroed_blocks[group] : highest + 1].zero_()
            self._zeroed_blocks[group] = highest + 1


def decode_kernel_available() -> bool:
    """The Triton paged-decode kernel runs here (CUDA and Triton present; not switched off)."""
    from .kernels import attention_choice

    if attention_choice() == "reference":
        return False
    try:
        from .kernels import decode_kernel_supported
    except ImportError:
        return False
    return decode_kernel_supported()


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or a platform it cannot read: assume a small machine
        return 4 * 2**30
