"""What the native engine (native/) takes on its device, part by part.

- Weights in the plan's weight format (`weight_bytes`: float32, bfloat16,
  int8, int4 or fp8 linear weights, the output projection included); norms
  stay float32. Without a format, the engine's dtype (float32 on the CPU,
  bfloat16 on CUDA). On the CPU a float32 output projection gets a
  oneDNN-ordered copy (layers/linear.py): kept beside a tied embedding table,
  replacing an untied head once it is made.
- The KV cache: the block pool the planner sizes and hands to the engine
  (`kv_cache_bytes`). Global layers hold the whole context; sliding-window
  layers, which keep a pool of their own, hold a decoding window per sequence
  plus one step's tokens: the engine's formulas, localllm/core/kv_sizing.py.
  Each pool has one scratch block more.
- Activations of the largest step (max_num_batched_tokens tokens: 256 on the
  CPU, 8192 on CUDA): the residual stream, the fused QKV and MLP products,
  the gathered keys and values of one layer, the attention mask in its three
  forms (bool, repeated for the grouped heads, additive in the compute
  dtype), logits for every sampling row (and on CUDA cuBLAS's workspaces).
- CUDA: captured decode graphs and the CUDA context (which
  torch.cuda.max_memory_allocated does not count, so `allocated` leaves it
  out). CPU: torch's own libraries and thread pools, which the process only
  loads with the engine, and what loading leaves behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from localllm.core.kv_sizing import KVGroup, demand, group_block_bytes, kv_groups
from localllm.core.modelinfo import ModelInfo
from localllm.core.units import MIB
from localllm.core.weight_formats import STORED_FORMATS, load_working_bytes

BLOCK_SIZE = 16
MAX_NUM_SEQS = 16  # the engine's default batch of sequences (NativeOptions.max_num_seqs)
CPU_STEP_TOKENS = 256  # max_num_batched_tokens on the CPU ...
CUDA_STEP_TOKENS = 8192  # ... and on CUDA (native/engine.py)
TORCH_CPU_RUNTIME_BYTES = 256 * MIB  # torch, MKL and oneDNN, and llama.cpp's tokenizer: measured 247 MiB
CPU_ALLOCATOR_OVERHEAD = 0.08  # of the float32 weights, kept by the allocator after loading: measured 8.1%
TORCH_CUDA_CONTEXT_BYTES = 640 * MIB  # the CUDA context with torch's kernels: measured 527 MiB on an H200 before use
CUDA_GRAPH_BYTES = 64 * MIB  # the private pool of the captured decode graphs
RUNTIME_WORKSPACE_BYTES = 96 * MIB  # cuBLAS workspaces and allocator rounding: measured 50-90 MiB on an H200
WEIGHT_FORMATS = STORED_FORMATS
INT4_GROUP = 32  # int4 values per scale and zero, along the input dimension
# Bytes a linear weight takes per value, and per output row or per group, as the packed kernels hold
# them (native/quant/): int4 two values a byte plus a bfloat16 scale and zero per group of 32 (the
# int4pack kernels take scales_and_zeros in bfloat16; QuantValues' float32 copies live only while
# loading); int8 one byte plus a bfloat16 scale per row (_weight_int8pack_mm scales in the
# activations' dtype); fp8 one byte plus a float32 scale per row (torch._scaled_mm's scales).
_VALUE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5, "fp8": 1.0}
_ROW_BYTES = {"int8": 2, "fp8": 4}
_GROUP_BYTES = {"int4": 2 * 2}


@dataclass(frozen=True)
class NativeShape:
    """The shape facts the formulas need; from a ModelInfo or a native ModelConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]
    tie_embeddings: bool
    parameters: int

    @classmethod
    def from_info(cls, info: ModelInfo) -> NativeShape:
        sliding = set(info.sliding_window_layers) if info.sliding_window else set()
        return cls(
            vocab_size=info.vocab_size,
            hidden_size=info.hidden_size,
            intermediate_size=info.intermediate_size or 4 * info.hidden_size,
            n_layers=info.n_layers,
            n_heads=info.n_heads,
            n_kv_heads=info.n_kv_heads,
            head_dim=info.head_dim,
            sliding_window=info.sliding_window,
            sliding_layers=tuple(i in sliding for i in range(info.n_layers)),
            tie_embeddings=info.output_bytes == 0,
            parameters=info.parameters,
        )

    @classmethod
    def from_config(cls, config: Any) -> NativeShape:
        """From localllm.core.model_config.ModelConfig (or anything with its attribute names)."""
        h, q, kv = config.hidden_size, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size + 4 * h + 2 * config.head_dim
        embeddings = config.vocab_size * h * (1 if config.tie_embeddings else 2)
        sliding = list(getattr(config, "sliding_layers", []) or [False] * config.n_layers)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=h,
            intermediate_size=config.intermediate_size,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            n_kv_heads=config.n_kv_heads,
            head_dim=config.head_dim,
            sliding_window=config.sliding_window if any(sliding) else None,
            sliding_layers=tuple(bool(s) for s in sliding),
            tie_embeddings=bool(config.tie_embeddings),
            parameters=config.n_layers * per_layer + embeddings + h,
        )


@dataclass(frozen=True)
class WeightParts:
    """Bytes of a model's weights in one format, by what reads them."""

    linear: int  # every layer's projections
    output: int  # the output projection (for a tied float table: the table itself)
    embedding: int  # a separate embedding table: untied, or a tied table kept apart from a quantized output
    other: int  # norms and biases, float32

    @property
    def total(self) -> int:
        return self.linear + self.output + self.embedding + self.other

    @property
    def read_per_token(self) -> int:
        """What one decode step reads: all but the embedding table, of which it gathers one row a token."""
        return self.linear + self.output + self.other


def _shape(config: Any) -> NativeShape:
    if isinstance(config, NativeShape):
        return config
    if isinstance(config, ModelInfo):
        return NativeShape.from_info(config)
    return NativeShape.from_config(config)


def _matrix_bytes(rows: int, cols: int, weights: str) -> int:
    values = int(rows * cols * _VALUE_BYTES[weights])
    groups = rows * -(-cols // INT4_GROUP) * _GROUP_BYTES[weights] if weights in _GROUP_BYTES else 0
    return values + rows * _ROW_BYTES.get(weights, 0) + groups


def weight_parts(config: Any, weights: str) -> WeightParts:
    """`weight_bytes` by part; config: a native ModelConfig, a NativeShape or a ModelInfo."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    shape = _shape(config)
    h, q, kv = shape.hidden_size, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    ffn = shape.intermediate_size
    matrices = [(q + 2 * kv, h), (h, q), (2 * ffn, h), (h, ffn)]  # fused QKV, O, fused gate/up, down
    linear = shape.n_layers * sum(_matrix_bytes(n, k, weights) for n, k in matrices)
    linear_params = shape.n_layers * sum(n * k for n, k in matrices)
    table_params = shape.vocab_size * h * (1 if shape.tie_embeddings else 2)
    other = max(0, shape.parameters - linear_params - table_params) * 4
    output = _matrix_bytes(shape.vocab_size, h, weights)
    quantized = weights not in ("float32", "bfloat16")
    # a tied float table serves both ends; a quantized output is packed in its kernel's tiled layout,
    # so the embedding lookup keeps its own copy (QuantEmbedding) in the same format
    embedding = output if (quantized or not shape.tie_embeddings) else 0
    return WeightParts(linear, output, embedding, other)


def weight_bytes(config: Any, weights: str) -> int:
    """Bytes the native engine's weights take in `weights` ("float32", "bfloat16", "int8", "int4", "fp8").

    Every linear weight, the output projection included, is stored in that
    format (see _VALUE_BYTES for the scales each format keeps); norms stay
    float32. A quantized model keeps its embedding table in the same format
    (a tied one twice: the output's packed copy and the lookup's own).
    """
    return weight_parts(config, weights).total


def compute_dtype_bytes(weights: str) -> int:
    """The dtype activations and the KV cache use: float32 for float32 weights, else bfloat16."""
    return 4 if weights == "float32" else 2


@dataclass
class NativeMemory:
    device: str
    dtype_bytes: int
    context: int
    parallel: int
    kv_bytes: int  # the pool budget to hand to the engine (scratch blocks not included)
    parts: dict[str, int] = field(default_factory=dict)
    outside_allocator: tuple[str, ...] = ()  # parts torch's allocator does not count
    loading_buffer: int = 0  # host bytes the streaming loader works in beside the resident weights

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def allocated_bytes(self) -> int:
        """Comparable with torch.cuda.max_memory_allocated (CUDA) after a full-context step."""
        return sum(v for k, v in self.parts.items() if k not in self.outside_allocator)


def kv_pool_blocks(shape: NativeShape, *, context: int, parallel: int, step_tokens: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """(layers, blocks) per KV pool for `parallel` sequences of `context` tokens.

    The engine's own sizing (localllm/core/kv_sizing.py): one pool for every
    layer unless sliding layers can save memory, then a second for them.
    """
    return [(len(group.layers), blocks) for group, blocks in _pools(shape, context, parallel, step_tokens, block_size)]


def _pools(shape: NativeShape, context: int, parallel: int, step_tokens: int, block_size: int) -> list[tuple[KVGroup, int]]:
    demand_of = dict(block_size=block_size, n_ctx=context, max_num_seqs=parallel, max_num_batched_tokens=step_tokens)
    return [(group, demand(group, **demand_of)) for group in kv_groups(shape, context, block_size)]


def activation_bytes(
    shape: NativeShape,
    *,
    context: int,
    step_tokens: int,
    dtype_bytes: int,
    sampling_rows: int,
    max_sequences: int = 1,
    materialized_scores: bool = False,
) -> int:
    """The largest step's live tensors (see the module docstring).

    A step of up to `step_tokens` tokens (several sequences' prompt chunks when
    more than one runs) goes through the projections and the MLP together;
    attention runs one sequence at a time, a chunk of up to a whole context
    against every key before it. Calibrated with torch's allocator on an H200
    (bf16; Llama-3.2-1B, Qwen2.5-7B and Gemma-3-270M shapes, contexts
    2048-16384), with the cuBLAS workspaces and graph pool beside it: within
    +0.1% to +4% of the measured peak, never below. On the CPU, attention
    with a mask also holds the scores and their softmax in float32
    (materialized_scores); calibrated there with the starter at 2048 and 8192.
    """
    d = dtype_bytes
    step = min(step_tokens, context * max(1, max_sequences))
    chunk = min(step_tokens, context)
    h, q, kv = shape.hidden_size, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    group = max(1, shape.n_heads // max(1, shape.n_kv_heads))
    residual = 2 * step * h * d  # the residual stream and its norm
    attention = (
        step * (q + 2 * kv) * d  # fused QKV
        + step * (q + kv) * d  # q and k after norm and rotary
        + 2 * step * q * d  # attention output and its copy
        + 2 * context * kv * d  # one sequence's gathered keys and values
        # its mask: bool, repeated for the grouped query heads, then additive in the compute dtype
        + chunk * context * (1 + group * (1 + d))
        + (2 * group * chunk * context * 4 * shape.n_kv_heads if materialized_scores else 0)
    )
    mlp = 4 * step * shape.intermediate_size * d  # gate and up, the activation, their product
    logits = sampling_rows * shape.vocab_size * 4
    return residual + max(attention, mlp) + logits


def native_memory(
    shape: NativeShape,
    *,
    device: str,
    context: int,
    parallel: int = 1,
    dtype_bytes: int | None = None,
    step_tokens: int | None = None,
    max_num_seqs: int = MAX_NUM_SEQS,
    kv_cache_bytes: int | None = None,
    block_size: int = BLOCK_SIZE,
    pack_output: bool = True,
    file_bytes: int = 0,
    weights: str | None = None,
) -> NativeMemory:
    """Memory of the native engine on `device` ("cpu" or "cuda") for `parallel` sequences of `context` tokens.

    file_bytes: the model file's size. On the CPU loading leaves about that
    much behind (file pages still mapped, freed dequantization buffers the C
    allocator keeps), beside an allocator overhead on the weights (both
    measured with the loader that built whole tensors; the streaming loader's
    working buffer is charged on top until it is measured again).
    weights: the weight format (weight_bytes); None: the engine's dtype, every parameter at its size.
    """
    cuda = device.startswith("cuda")
    d = dtype_bytes or (compute_dtype_bytes(weights) if weights else (2 if cuda else 4))
    step = step_tokens or (CUDA_STEP_TOKENS if cuda else CPU_STEP_TOKENS)
    pools = [(blocks, group_block_bytes(group, shape, block_size, d)) for group, blocks in _pools(shape, context, parallel, step, block_size)]
    planned_kv = sum(blocks * size for blocks, size in pools)
    kv = planned_kv if kv_cache_bytes is None else kv_cache_bytes
    scratch = sum(size for _, size in pools)

    mem = NativeMemory("cuda" if cuda else "cpu", d, context, parallel, kv)
    fused = max(shape.n_heads * shape.head_dim + 2 * shape.n_kv_heads * shape.head_dim, 2 * shape.intermediate_size)
    mem.loading_buffer = load_working_bytes(
        weights or "float32", table_values=shape.vocab_size * shape.hidden_size, largest_fused_values=fused * shape.hidden_size
    )
    parts = mem.parts
    parts["weights"] = weight_bytes(shape, weights) if weights else shape.parameters * d
    if not cuda and pack_output and d == 4 and weights in (None, "float32"):  # kept beside a tied embedding; beside an untied head while packing
        parts["packed output copy"] = shape.vocab_size * shape.hidden_size * 4
    parts["KV cache"] = kv + scratch
    parts["activations"] = activation_bytes(
        shape, context=context, step_tokens=step, dtype_bytes=d, sampling_rows=max_num_seqs,
        max_sequences=max(parallel, max_num_seqs), materialized_scores=not cuda,
    )
    if cuda:
        parts["cuBLAS workspaces"] = RUNTIME_WORKSPACE_BYTES
        parts["CUDA graphs"] = CUDA_GRAPH_BYTES
        parts["CUDA context"] = TORCH_CUDA_CONTEXT_BYTES
        mem.outside_allocator = ("CUDA context",)
    else:
        parts["torch runtime"] = TORCH_CPU_RUNTIME_BYTES
        parts["loading leftovers"] = file_bytes + int(CPU_ALLOCATOR_OVERHEAD * parts["weights"]) + mem.loading_buffer
    return mem


def predict_native_vram(
    config: Any,
    device: str = "cuda",
    context: int = 4096,
    *,
    parallel: int = 1,
    max_num_seqs: int = MAX_NUM_SEQS,
    step_tokens: int | None = None,
    kv_cache_bytes: int | None = None,
    dtype_bytes: int | None = None,
    weights: str | None = None,
) -> NativeMemory:
    """Predicted memory of the native engine for a native ModelConfig (or NativeShape / ModelInfo).

    For a GPU check: run the engine with kv_cache_bytes=result.kv_bytes (so the
    pool is what was planned rather than what is free), then compare
    torch.cuda.max_memory_allocated() with result.allocated_bytes; result.parts
    says where each byte was expected.
    """
    return native_memory(
        _shape(config),
        device=device,
        context=context,
        parallel=parallel,
        dtype_bytes=dtype_bytes,
        step_tokens=step_tokens,
        max_num_seqs=max_num_seqs,
        kv_cache_bytes=kv_cache_bytes,
        weights=weights,
    )
