"""The model, its KV cache, and turning a scheduled step into one forward pass.

The runner owns the device side: it loads the weights, sizes and allocates
the block pool, lays a step's tokens out as one flat batch (token ids,
positions, cache slots, per-sequence spans), runs the model, and computes
logits only for the rows that sample.

Sizing the pool:
- CPU: from a RAM budget (an option; by default a quarter of the memory
  available now, but no more than max_num_seqs full contexts need). CPU pages
  are only touched when written, so an unused pool costs address space, not RAM.
- CUDA: from measured memory. A profiling pass runs the worst step the
  scheduler can produce, a full prompt chunk at the end of the longest
  context (its prefill mask, chunk x context, and the gathered keys grow with
  both), measures the activation peak, and gives the cache what is left of
  `gpu_memory_utilization` of the device.
- A draft model on the same GPU (speculative decoding) is planned with its
  target: the target measures but waits, the draft loads and measures, and
  one budget is split between both pools in proportion to what each could
  use (`share_gpu`), so both hold the same number of tokens. Sized one after
  the other, the draft would find the target's pool already in the share and
  get a negative budget.
When contexts can outgrow a sliding window, the sliding layers get a pool of
their own (a second KV group, see localllm/core/kv_sizing.py) and the budget is split
between the pools; each pool has its own scratch block.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from localllm.core.context_checks import context_size
from localllm.core.errors import BadRequest, DoesNotFit

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
    defer_cache: bool = False  # CUDA: measure, then wait for a partner (a draft) to size both pools (share_gpu)


@dataclass
class CudaMemory:
    """One model's side of a GPU, from its profiling pass (bytes)."""

    total: int  # the device's memory
    used_elsewhere: int  # other processes, the CUDA context, the allocator's slack
    weights: int  # what this model keeps allocated: its weights and buffers
    activation_peak: int  # the worst step's transient peak above that (the profiling pool not counted)
    fixed: int  # allocated later beside its pool: the gather workspace and the scratch blocks
    kv_demand: int  # KV bytes its sequences could use at once (demand_bytes): the split's weight


class ModelRunner:
    def __init__(
        self, model_path: Path | LoadedWeights, options: RunnerOptions, *, partner: ModelRunner | None = None
    ) -> None:
        """`model_path` is a file or folder, or weights already in memory (random-weight benchmarks).

        `partner`: a runner on the same GPU that measured with defer_cache and waits (the target of this
        draft); both pools are then sized together (share_gpu).
        """
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
        self._allocated_before = 0 if on_cpu else torch.cuda.memory_allocated(self.device)  # other models' weights
        self.graphs = None
        self.awaits_partner = False  # CUDA with defer_cache: measured, the pool not yet sized
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
        if on_cpu:
            self.allocate()
        else:  # measured, so only now
            self.memory = self._measure_cuda()
            self.awaits_partner = options.defer_cache and partner is None
            if partner is not None:
                share_gpu([partner, self])
            elif not self.awaits_partner:
                share_gpu([self])

    def allocate(self, cuda_budget: int | None = None) -> None:
        """Size the pools (CUDA: from `cuda_budget`, see share_gpu), allocate them, capture the decode graphs."""
        options = self.options
        if self.device.type == "cuda":
            self.num_blocks = self._plan_blocks(cuda_budget)
            self.awaits_partner = False
        self._allocate_cache()
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

    def _plan_blocks(self, cuda_budget: int | None = None) -> int:
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
            budget = max(0, cuda_budget or 0)
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

    def _measure_cuda(self) -> CudaMemory:
        """Run the worst step on a small pool and measure what it needs beside the pool."""
        o = self.options
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(self.device) - self._allocated_before
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        n_tokens, context = profile_shape(o.n_ctx, o.max_num_batched_tokens)
        self._allocate_cache(self.blocks_for_tokens(n_tokens) + 1)
        pool = sum(c.numel() * c.element_size() for c in self.kv_caches)
        try:
            self._profile_step()
        except torch.cuda.OutOfMemoryError:
            raise DoesNotFit(
                f"the GPU has no room for a prompt chunk of {n_tokens} tokens at a context of {context}; lower the context"
            ) from None
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self._drop_cache()
        torch.cuda.empty_cache()
        current = torch.cuda.memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # The reference attention gathers a decode batch's keys and values into a workspace:
        # at worst every sequence at full length, one layer at a time. The decode kernel reads
        # the cache in place; then only a prompt chunk over a cached prefix gathers (one context).
        c = self.config
        gathered_seqs = 1 if self.decode_kernel else o.max_num_seqs
        gather = 2 * gathered_seqs * o.n_ctx * c.n_kv_heads * c.head_dim * self.dtype_bytes
        shape = dict(block_size=self.block_size, n_ctx=o.n_ctx, max_num_seqs=o.max_num_seqs,
                     max_num_batched_tokens=o.max_num_batched_tokens)
        return CudaMemory(
            total=total,
            used_elsewhere=total - free - current,  # other processes, the CUDA context, the allocator's slack
            weights=weights,
            activation_peak=max(0, peak - before - pool),
            fixed=gather + sum(self.group_block_bytes),  # the workspace and one scratch block per group
            kv_demand=demand_bytes(self.kv_groups, self.group_block_bytes, **shape),
        )

    def _drop_cache(self) -> None:
        self.kv_cache = None
        self.kv_caches = []
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = None

    def _verify_fusions(self) -> None:
        """The fused kernels, checked once at this model's shapes; the separate ones if they fail (one line on stderr)."""
        from .kernel_check import verify_fusions

        failed = verify_fusions(self.config, self.dtype, self.device)
        if failed:
            sys.stderr.write(f"localllm: fused GPU kernels are off ({failed}); the separate kernels run instead\n")

    def blocks_for_tokens(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @torch.inference_mode()
    def _profile_step(self) -> AttentionBatch:
        """The worst step (profile_shape), plus logits for the most rows a step samples.

        Its context is spread over the pool allocated now (at least one block more
        than the chunk needs): the table wraps around, so the chunk's own slots are
        distinct while the keys before it read blocks again. The contents do not
        matter, only the shapes. Returns the batch, whose views hold the masks the
        step built (tests look at them).
        """
        n_tokens, context = profile_shape(self.options.n_ctx, self.options.max_num_batched_tokens)
        bs, pool = self.block_size, self.scratch_block  # blocks allocated, the scratch block aside
        table = [i % pool for i in range(self.blocks_for_tokens(context))]
        span = SeqSpan(0, n_tokens, context, table)
        positions = range(context - n_tokens, context)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in positions], dtype=torch.int64, device=self.device)
        batch = AttentionBatch([span], slots, bs, self.device)
        ids = torch.zeros(n_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, torch.arange(context - n_tokens, context, device=self.device), batch)
        rows = self.options.max_logit_rows or self.options.max_num_seqs
        self.model.compute_logits(hidden[:rows] if rows <= n_tokens else hidden.new_zeros(rows, hidden.shape[-1]))
        return batch

    def close(self) -> None:
        """Drop the model, the KV pools, the CUDA graphs and the workspace; on CUDA hand the memory back.

        An unloaded model must free its device memory even while something still
        holds this runner (a backend object, an engine): PyTorch's caching allocator
        keeps freed blocks for itself until empty_cache, and modules and captured
        graphs form reference cycles that only a collection breaks.
        """
        if self.graphs is not None:
            for graph in self.graphs.graphs.values():
                graph.reset()  # its private memory pool goes with it
        self.graphs = None
        self.kv_caches = []
        self.kv_cache = None
        self.model = None
        self.workspace = Workspace()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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


def profile_shape(n_ctx: int, max_num_batched_tokens: int) -> tuple[int, int]:
    """(new tokens, context) of the step that needs the most memory besides the pool.

    A prompt chunk attends to everything before it, so its prefill mask is
    chunk x context booleans (repeated per query head sharing a KV head, and
    turned into a float bias by attention), and its gathered keys and values
    span the context: both are largest for a full chunk ending at the last
    position. The chunks of one step together never exceed that.
    """
    return min(max_num_batched_tokens, n_ctx), n_ctx


def share_gpu(runners: list[ModelRunner]) -> None:
    """Size and allocate the pools of the models on one GPU (a target, then its draft) from one budget."""
    latest = runners[-1].memory  # measured last: it sees every model's weights in place
    budgets = shared_kv_budgets(
        latest.total,
        runners[0].options.gpu_memory_utilization,
        latest.used_elsewhere,
        weights=[r.memory.weights for r in runners],
        activation_peaks=[r.memory.activation_peak for r in runners],
        fixed=[r.memory.fixed for r in runners],
        demands=[r.memory.kv_demand for r in runners],
    )
    for runner, budget in zip(runners, budgets):
        runner.allocate(budget)


def shared_kv_budgets(
    total: int,
    utilization: float,
    used_elsewhere: int,
    *,
    weights: list[int],
    activation_peaks: list[int],
    fixed: list[int],
    demands: list[int],
) -> list[int]:
    """KV bytes for each model sharing a GPU: what `utilization` of it leaves, split in proportion to demand.

    The models run one after the other (a draft guesses, then the target
    checks), so only the largest activation peak is ever needed at once; the
    allocator reuses the memory of one's step for the other's. Splitting by
    demand gives every model the same share of what its sequences could use:
    a draft mirrors the target's sequences, so both hold as many tokens.
    Never negative: a model with 0 is refused by split_budget with a clear message.
    """
    room = int(total * utilization) - used_elsewhere - sum(weights) - max(activation_peaks) - sum(fixed)
    if room <= 0:
        return [0] * len(weights)
    wanted = sum(demands)
    return [room * d // wanted if wanted else room // len(demands) for d in demands]


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
