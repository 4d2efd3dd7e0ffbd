"""Triton kernels for the native engine on GPUs: paged decode attention and the KV store.

They replace the torch reference in native/layers/attention.py with the same
contract (see `DecodeMeta` there): the dispatcher there uses them on CUDA when
Triton imports, unless LOCALLLM_NATIVE_ATTENTION=reference. Everything else
(prompt chunks, the CPU) keeps the reference path.

Two of them join several ops into one launch: the residual add with the norm
that reads it (fused.add_rms_norm), and a decode step's q/k norms, rotary and
KV store (rope_store.py). LOCALLLM_NATIVE_FUSED=off switches both off (the
ops then run as separate kernels), so one GPU run can time an engine built
with them against one built without; the default is on.

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
- `norm_rope_store(q, k, v, cos, sin, k_cache, v_cache, slots, q_norm=, k_norm=)`: a decode step's
  queries normed and rotated (returned), keys normed and rotated into the cache with the values
- `fusions_on()`: False under LOCALLLM_NATIVE_FUSED=off
- native/kernel_check.py: `selfcheck(device)`, the kernels against the torch reference on random shapes;
  `time_decode_attention(device)`, kernel vs reference timings; `verify_fusions`, the start-up check
"""

from __future__ import annotations

import os
from functools import lru_cache

from localllm.core.env_vars import env_choice, env_flag

ATTENTION_CHOICES = ("auto", "triton", "reference")


def attention_choice() -> str:
    """LOCALLLM_NATIVE_ATTENTION: auto (kernels on CUDA), triton (forced) or reference (torch only)."""
    return env_choice("LOCALLLM_NATIVE_ATTENTION", ATTENTION_CHOICES, "auto")


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
    choice = attention_choice()
    if choice == "reference" or (choice != "triton" and not x.is_cuda) or not triton_importable():
        return None
    from . import fused

    return fused


_fusions_failed: str | None = None  # why the start-up check switched the fused kernels off (verify_fusions)


def fusions_on() -> bool:
    """Whether the kernels that join several ops run where they can (LOCALLLM_NATIVE_FUSED, default on).

    Read at every call, like LOCALLLM_NATIVE_ATTENTION; a CUDA graph keeps what
    was chosen when it was captured, so an A/B comparison builds two engines.
    Off for the rest of the process once verify_fusions has seen them fail.
    """
    if _fusions_failed is not None:
        return False
    return env_flag("LOCALLLM_NATIVE_FUSED", True)


def switch_fusions_off(reason: str | None) -> None:
    """Turn the fused kernels off for this process (reason given), or back on (None); see kernel_check.verify_fusions."""
    global _fusions_failed
    _fusions_failed = reason


def fusions_off_reason() -> str | None:
    return _fusions_failed


def paged_decode_attention(*args, **kwargs):
    from .decode_attention import paged_decode_attention as kernel

    return kernel(*args, **kwargs)


def store_kv(*args, **kwargs):
    from .kv_store import store_kv as kernel

    return kernel(*args, **kwargs)


def norm_rope_store(*args, **kwargs):
    from .rope_store import norm_rope_store as kernel

    return kernel(*args, **kwargs)
