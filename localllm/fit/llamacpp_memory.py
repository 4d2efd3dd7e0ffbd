"""What llama.cpp takes in RAM and VRAM for a GGUF model, part by part.

The parts, as llama.cpp's own log names them (llama-cpp-python 0.3.36):
- Weights, from the GGUF's tensor sizes. Repeating layers go to the GPU from
  the last one down; the output layer counts as one more layer (so
  n_gpu_layers = n_layers + 1 offloads everything) and, when the file ties it
  to the embeddings, puts a copy of them on the GPU. The token embeddings
  always stay in RAM. On the CPU the file is memory-mapped, and a forward
  pass touches every page; Q4_0/Q4_K/IQ4_NL matrices of CPU layers also get
  an interleaved copy (the CPU_REPACK buffer).
- The KV cache: per layer n_ctx x n_kv_heads x (k_dim + v_dim) x 2 bytes
  (f16), on the layer's device; n_ctx is the context times the parallel
  sequences, padded to 256. Sliding-window layers: the backend creates its
  context with llama.cpp's FULL-size sliding-window cache (swa_full, which
  llama-cpp-python 0.3.36 also defaults to), because reusing a long chat's
  prompt rewinds a sequence, which a window-sized cache cannot do; so they
  are sized like the others. With the window-sized cache they would keep
  window + n_ubatch cells.
- Compute buffers. llama.cpp reserves the worst case: where the output layer
  runs, the logits of a whole micro-batch (n_vocab x n_ubatch x 4 bytes:
  512 MiB for Gemma 3's 262,144-token vocabulary at n_ubatch 512) or a layer's
  activations, whichever is larger; plus the attention masks (n_ctx x n_ubatch
  x 2 bytes each, one per kind of layer). A GPU allocates all of it. In RAM,
  pages count only once touched, and our backends ask for the logits of a
  prompt's last token only, so what counts is a layer's activations for a
  full micro-batch, the masks at the full context, one logits row per
  sequence and the CPU threads' work buffers. With a GPU build the CPU's
  share is pinned host memory, which is allocated whole.
- The output buffer (n_vocab x 4 bytes per slot), the vocabulary's
  strings and maps (~170 bytes a token), llama.cpp's bookkeeping per KV cell,
  the CUDA context on every GPU and the CUDA libraries in RAM.

Calibrated on the starter at contexts 2,048, 8,192 and 32,768 with
full-context prompts (benchmarks/fit_accuracy.py prints the prediction against
the measured peak); the constants below say where each number came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localllm.core.units import MIB
from localllm.core.modelinfo import ModelInfo

LLAMACPP_SWA_FULL = True  # the backend must create its context with swa_full=True (see above)
KV_DTYPE_BYTES = 2  # f16 K and V, llama.cpp's default cache type
N_UBATCH = 512  # the backend's micro-batch (n_batch = n_ubatch)
CTX_PAD = 256  # llama.cpp pads the KV cache to this many cells
VOCAB_BYTES_PER_TOKEN = 170  # llama.cpp's vocabulary in RAM: measured 166 B/token for 262,144 tokens
CPU_RUNTIME_BYTES = 24 * MIB  # CPU threads' work buffers and allocator slack: measured 15-20 MiB
CELL_BYTES = 192  # per KV cell and kind of layer: llama.cpp's cell bookkeeping (positions, sequence sets)
CUDA_CONTEXT_BYTES = 512 * MIB  # per GPU: CUDA context and cuBLAS (not measured for llama.cpp; torch: 527 MiB on an H200)
CUDA_HOST_BYTES = 384 * MIB  # CUDA and cuBLAS libraries resident in RAM once a GPU is used
BACKEND_SLOTS = 4  # the backend's default n_parallel (backends/llamacpp.py): one logits row each


@dataclass
class LlamaCppMemory:
    """Bytes by part on each side; `ram` is what the process grows by, `vram` what it allocates."""

    n_gpu_layers: int
    n_ctx: int  # KV cells: context x parallel, padded
    kv_bytes: int  # all layers, both sides
    ram: dict[str, int] = field(default_factory=dict)
    vram: dict[str, int] = field(default_factory=dict)

    @property
    def ram_bytes(self) -> int:
        return sum(self.ram.values())

    @property
    def vram_bytes(self) -> int:
        return sum(self.vram.values())


def pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kv_cells(info: ModelInfo, layer: int, n_ctx: int, parallel: int, swa_full: bool = LLAMACPP_SWA_FULL) -> int:
    """Cells llama.cpp gives one layer's KV cache."""
    if swa_full or not info.sliding_window or layer not in set(info.sliding_window_layers):
        return n_ctx
    return min(n_ctx, pad(info.sliding_window * parallel + N_UBATCH, CTX_PAD))


def kv_layer_bytes(info: ModelInfo, n_ctx: int, parallel: int, swa_full: bool = LLAMACPP_SWA_FULL) -> list[int]:
    per_cell = info.n_kv_heads * info.head_dim * 2 * KV_DTYPE_BYTES  # K and V
    return [kv_cells(info, i, n_ctx, parallel, swa_full) * per_cell for i in range(info.n_layers)]


def layer_activation_bytes(info: ModelInfo, n_tokens: int = N_UBATCH) -> int:
    """A layer's live activations for a micro-batch (float32): residual, norm, FFN gate, up and product."""
    ffn = info.intermediate_size or 4 * info.hidden_size
    return n_tokens * 4 * (2 * info.hidden_size + 3 * ffn)


def logits_reserve_bytes(info: ModelInfo, n_tokens: int = N_UBATCH) -> int:
    """The worst-case graph's end: logits for every token plus the normed hidden states feeding them."""
    return n_tokens * 4 * (info.vocab_size + 2 * info.hidden_size)


def layer_kinds(info: ModelInfo) -> int:
    """1, or 2 when full-attention and sliding-window layers mix (llama.cpp then keeps two caches and masks)."""
    return 2 if info.sliding_window_layers and len(set(info.sliding_window_layers)) < info.n_layers else 1


def mask_bytes(info: ModelInfo, n_ctx: int) -> int:
    """f16 attention masks, one per kind of layer (full and sliding), for a micro-batch over the whole cache."""
    return layer_kinds(info) * n_ctx * N_UBATCH * 2


def llamacpp_memory(info: ModelInfo, *, context: int, parallel: int = 1, n_gpu_layers: int = 0, n_gpus: int = 0) -> LlamaCppMemory:
    """Memory for `info` at `context` tokens per sequence with `n_gpu_layers` offloaded over `n_gpus` GPUs."""
    n_layers = info.n_layers
    gpu_layers = max(0, min(n_gpu_layers, n_layers + 1)) if n_gpus else 0
    first_gpu_layer = n_layers + 1 - gpu_layers  # layers from here up, and the output layer (index n_layers)
    output_on_gpu = gpu_layers >= 1
    n_ctx = pad(context * parallel, CTX_PAD)
    kv = kv_layer_bytes(info, n_ctx, parallel)
    weights = info.layer_weight_bytes[:n_layers] + [0] * (n_layers - len(info.layer_weight_bytes))
    repack = info.layer_repack_bytes[:n_layers] + [0] * (n_layers - len(info.layer_repack_bytes))
    on_gpu = [i >= first_gpu_layer for i in range(n_layers)]
    extra_layers = sum(info.layer_weight_bytes[n_layers:])  # e.g. prediction layers past block_count

    mem = LlamaCppMemory(gpu_layers, n_ctx, sum(kv))
    ram, vram = mem.ram, mem.vram
    ram["weights"] = (
        sum(w for w, g in zip(weights, on_gpu) if not g)
        + info.token_embd_bytes
        + extra_layers
        + (0 if output_on_gpu else info.output_bytes + info.other_bytes)
    )
    ram["repacked weights"] = sum(r for r, g in zip(repack, on_gpu) if not g)
    ram["KV cache"] = sum(b for b, g in zip(kv, on_gpu) if not g)
    ram["KV bookkeeping"] = CELL_BYTES * n_ctx * layer_kinds(info)
    ram["vocabulary"] = VOCAB_BYTES_PER_TOKEN * info.vocab_size
    rows = max(parallel, BACKEND_SLOTS)  # logits rows: one per sequence decoding together
    ram["output buffer"] = 4 * info.vocab_size * rows
    masks = mask_bytes(info, n_ctx)
    if n_gpus:
        # a GPU build pins the CPU's compute buffer: allocated whole, its worst case included
        if not output_on_gpu:
            cpu_compute = max(layer_activation_bytes(info), logits_reserve_bytes(info)) + masks
        elif not all(on_gpu):
            cpu_compute = layer_activation_bytes(info) + masks
        else:  # only the embedding lookup runs on the CPU
            cpu_compute = N_UBATCH * 4 * info.hidden_size
        ram["compute buffer"] = cpu_compute + CPU_RUNTIME_BYTES
        ram["CUDA libraries"] = CUDA_HOST_BYTES
    else:
        ram["compute buffer"] = layer_activation_bytes(info) + masks + 4 * info.vocab_size * rows + CPU_RUNTIME_BYTES

    if gpu_layers:
        output_gpu = (info.output_bytes or info.token_embd_bytes) + info.other_bytes
        vram["weights"] = sum(w for w, g in zip(weights, on_gpu) if g) + output_gpu
        vram["KV cache"] = sum(b for b, g in zip(kv, on_gpu) if g)
        main = max(layer_activation_bytes(info), logits_reserve_bytes(info)) + masks
        others = (layer_activation_bytes(info) + masks) * (n_gpus - 1)
        vram["compute buffer"] = main + others
        vram["CUDA context"] = CUDA_CONTEXT_BYTES * n_gpus
    return mem
