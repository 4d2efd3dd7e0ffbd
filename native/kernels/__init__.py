"""Triton kernels for the native engine on GPUs: paged decode attention and the KV store.

They replace the torch reference in native/layers/attention.py with the same
contract (see `DecodeMeta` there): the dispatcher there uses them on CUDA when
Triton imports, unless LOCALLLM_NATIVE_ATTENTION=reference. Everything else
(prompt chunks, the CPU) keeps the reference path.

Without a GPU they run under Triton's interpreter: set TRITON_INTERPRET=1
*before* this package's modules are imported (Triton decides at decoration
time whether a kernel is compiled or interpreted). tests/test_triton_kernels.py
does that; the interpreter is slow, so those tests use small shapes.

Importing this package needs neither torch nor Triton; the functions below
import them when called.

- `paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, window=, scale=)`
- `fused_for(x)`: the fused RMSNorm, residual add + RMSNorm, rotary and gated-activation kernels
  (fused.py) where they run
- `store_kv(k, v, k_cache, v_cache, slots)`
- `selfcheck(device)`: the kernels against the torch reference on random shapes
- `time_decode_attention(device)`: kernel vs reference timings at real model shapes
"""

from __future__ import annotations

import os
from functools import lru_cache


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading
        return False
    return True


def decode_kernel_supported() -> bool:
    """The kernels can run here: a CUDA device and Triton (or Triton's interpreter, for tests)."""
    if not triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def fused_for(x):
    """native.kernels.fused when `x`'s device runs the fused elementwise kernels, else None.

    Same switch as the attention kernels: CUDA with Triton, unless
    LOCALLLM_NATIVE_ATTENTION=reference; =triton forces them (the interpreter, in tests).
    """
    choice = os.environ.get("LOCALLLM_NATIVE_ATTENTION", "auto")
    if choice == "reference" or (choice != "triton" and not x.is_cuda) or not triton_importable():
        return None
    from . import fused

    return fused


def paged_decode_attention(*args, **kwargs):
    from .decode_attention import paged_decode_attention as kernel

    return kernel(*args, **kwargs)


def store_kv(*args, **kwargs):
    from .kv_store import store_kv as kernel

    return kernel(*args, **kwargs)


def selfcheck(device="cuda", **kwargs):
    from .check import selfcheck as run

    return run(device, **kwargs)


def time_decode_attention(device="cuda", **kwargs):
    from .check import time_decode_attention as run

    return run(device, **kwargs)
