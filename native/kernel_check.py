"""The kernels against the torch reference, on random shapes; and their speed at real model shapes.

`selfcheck(device)` is what the GPU check script runs once on a real GPU, and
what tests/test_triton_kernels.py runs under Triton's interpreter on the CPU:
the same cases, so the interpreter tests and the GPU agree on what "correct"
means. The reference is `paged_attention` of native/layers/attention.py (its
per-sequence span path), which the engine's model tests pin against
transformers. The fused residual add + RMSNorm kernel is checked beside them
against `RMSNorm.add_and_norm` on its torch path, at hidden sizes of real models,
and the decode step's q/k norm + rotary + KV-store kernel against the layers'
torch ops it replaces, at head counts and dims of real models.
"""

from __future__ import annotations

import os
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from native import kernels

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Case:
    """One random comparison: a batch of decoding sequences of the given lengths."""

    n_heads: int
    n_kv: int
    head_dim: int
    block_size: int
    lengths: tuple[int, ...]  # tokens in each sequence's cache, its new one included
    window: int | None = None
    num_splits: int = 1

    @property
    def name(self) -> str:
        w = f" window {self.window}" if self.window else ""
        return (f"{self.n_heads}q/{self.n_kv}kv d{self.head_dim} bs{self.block_size}{w} "
                f"splits {self.num_splits} lengths {list(self.lengths)}")


# Small enough for the interpreter (all of them take a few seconds there), wide enough to
# cross every edge: GQA ratios 1, 4, 7, 8; block sizes 16 and 32; a window shorter than the
# context and one longer; lengths of 1, exact block multiples and several tiles; split-K.
CASES: tuple[Case, ...] = (
    Case(4, 4, 32, 16, (1, 17, 64, 130)),
    Case(8, 2, 64, 16, (5, 33, 100, 190), window=40),
    Case(8, 1, 64, 32, (2, 31, 32, 77, 150), window=24),
    Case(8, 1, 32, 32, (200, 9), window=300),
    Case(7, 1, 80, 16, (3, 70, 129)),
    Case(8, 2, 64, 16, (1, 90, 257), num_splits=4),
    Case(4, 1, 64, 16, (150, 300), window=100, num_splits=2),
)

# Real shapes for the GPU: Llama-3.2-1B (32q/8kv, d64), Qwen2.5-7B (28q/4kv, d128), Gemma 3 (d256, window),
# SmolLM2 135M, the default chat model (9q/3kv: groups of three, d64).
GPU_CASES: tuple[Case, ...] = CASES + (
    Case(9, 3, 64, 16, (1, 100, 1000, 2047)),
    Case(32, 8, 64, 16, (1, 100, 1000, 2047, 2048, 3000)),
    Case(28, 4, 128, 16, (1, 513, 2048, 4097)),
    Case(4, 1, 256, 16, (600, 1500, 40), window=512),
    Case(28, 4, 128, 32, (4000,), num_splits=8),
)


@dataclass(frozen=True)
class AddNormCase:
    """One random comparison of fused.add_rms_norm: rows of one hidden size; sandwich = Gemma's normed delta."""

    rows: int
    dim: int
    sandwich: bool = False

    @property
    def name(self) -> str:
        return f"add+RMSNorm{' of a normed delta' if self.sandwich else ''}, {self.rows} x {self.dim}"


# Odd and power-of-two sizes for the interpreter; Llama 1B/8B, Qwen2.5-7B and Gemma 3 1B/4B/27B on the GPU.
ADD_NORM_CASES: tuple[AddNormCase, ...] = (
    AddNormCase(1, 64), AddNormCase(3, 1000), AddNormCase(2, 96, sandwich=True), AddNormCase(5, 640, sandwich=True),
)
GPU_ADD_NORM_CASES: tuple[AddNormCase, ...] = ADD_NORM_CASES + (
    AddNormCase(64, 2048), AddNormCase(1, 4096), AddNormCase(33, 3584),
    AddNormCase(64, 1152, sandwich=True), AddNormCase(7, 2560, sandwich=True), AddNormCase(64, 5376, sandwich=True),
)


@dataclass(frozen=True)
class RopeStoreCase:
    """One random comparison of rope_store.norm_rope_store: a decode step's new tokens of one layer.

    `padding` rows follow the real ones, as a captured batch's: all the same
    token at position 0, stored into the scratch block's first slot.
    """

    tokens: int
    n_heads: int
    n_kv: int
    head_dim: int
    qk_norm: bool = False
    padding: int = 0
    block_size: int = 16

    @property
    def name(self) -> str:
        norm = " qk-norm" if self.qk_norm else ""
        pad = f" + {self.padding} padding" if self.padding else ""
        return f"norm+rotary+store {self.n_heads}q/{self.n_kv}kv d{self.head_dim}{norm}, {self.tokens} tokens{pad}"


# GQA 1/4/8, head dims 32 to 256 (80: not a power of two), with and without q/k norms, padding rows.
ROPE_STORE_CASES: tuple[RopeStoreCase, ...] = (
    RopeStoreCase(3, 4, 4, 32),
    RopeStoreCase(2, 8, 2, 64, qk_norm=True),
    RopeStoreCase(2, 8, 1, 128, padding=2),
    RopeStoreCase(1, 2, 1, 256, qk_norm=True),
    RopeStoreCase(2, 4, 2, 80, qk_norm=True, padding=1),
)
# Llama-3.2-1B, Qwen2.5-7B, Qwen3-8B, Gemma 3 1B/4B/27B at batch 1 and at a padded batch of 64.
GPU_ROPE_STORE_CASES: tuple[RopeStoreCase, ...] = ROPE_STORE_CASES + (
    RopeStoreCase(1, 32, 8, 64), RopeStoreCase(61, 32, 8, 64, padding=3),
    RopeStoreCase(1, 28, 4, 128), RopeStoreCase(33, 28, 4, 128, padding=7),
    RopeStoreCase(1, 32, 8, 128, qk_norm=True), RopeStoreCase(64, 32, 8, 128, qk_norm=True),
    RopeStoreCase(1, 4, 1, 256, qk_norm=True), RopeStoreCase(60, 4, 1, 256, qk_norm=True, padding=4),
    RopeStoreCase(5, 8, 4, 256, qk_norm=True), RopeStoreCase(1, 32, 16, 128, qk_norm=True),
)


@dataclass
class Result:
    case: Case
    dtype: torch.dtype
    attention_error: float  # max |kernel - reference| over the outputs
    store_error: float  # max |kernel cache - reference cache| after storing the new tokens
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.attention_error <= self.tolerance and self.store_error == 0.0


@dataclass
class AddNormResult:
    case: AddNormCase
    dtype: torch.dtype
    residual_error: float  # max |kernel - layers| over x + delta, relative to its largest value
    norm_error: float  # the same over the normed output
    tolerance: float
    exact_residual: bool  # one rounding of the same float32 sum, as torch's add: must be the same bits

    @property
    def ok(self) -> bool:
        residual_ok = self.residual_error == 0.0 if self.exact_residual else self.residual_error <= self.tolerance
        return residual_ok and self.norm_error <= self.tolerance

    def line(self) -> str:
        residual = f"{self.residual_error:.0e}{' (must be 0)' if self.exact_residual else ''}"
        return (f"{'ok ' if self.ok else 'BAD'} {str(self.dtype).replace('torch.', ''):8s} "
                f"norm err {self.norm_error:.2e} (tol {self.tolerance:.0e}), sum err {residual}: {self.case.name}")


@dataclass
class RopeStoreResult:
    case: RopeStoreCase
    dtype: torch.dtype
    q_error: float  # max |kernel - layers| over the queries, relative to their largest value
    k_error: float  # the same over the keys in the cache (every slot, written or not)
    v_error: float  # max |kernel - layers| over the value cache: a copy, so 0
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.q_error <= self.tolerance and self.k_error <= self.tolerance and self.v_error == 0.0

    def line(self) -> str:
        return (f"{'ok ' if self.ok else 'BAD'} {str(self.dtype).replace('torch.', ''):8s} "
                f"q err {self.q_error:.2e}, k err {self.k_error:.2e} (tol {self.tolerance:.0e}), "
                f"v err {self.v_error:.0e} (must be 0): {self.case.name}")


@dataclass
class Report:
    device: str
    results: list[Result] = field(default_factory=list)
    add_norm: list[AddNormResult] = field(default_factory=list)
    rope_store: list[RopeStoreResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (bool(self.results) and all(r.ok for r in self.results) and all(r.ok for r in self.add_norm)
                and all(r.ok for r in self.rope_store))

    @property
    def max_errors(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.results:
            key = str(r.dtype).replace("torch.", "")
            out[key] = max(out.get(key, 0.0), r.attention_error)
        return out

    def lines(self) -> list[str]:
        lines = [f"{'ok ' if r.ok else 'BAD'} {str(r.dtype).replace('torch.', ''):8s} "
                 f"max err {r.attention_error:.2e} (tol {r.tolerance:.0e}), store err {r.store_error:.0e}: {r.case.name}"
                 for r in self.results]
        lines += [r.line() for r in self.add_norm]
        lines += [r.line() for r in self.rope_store]
        summary = ", ".join(f"{k} {v:.2e}" for k, v in self.max_errors.items())
        count = len(self.results) + len(self.add_norm) + len(self.rope_store)
        lines.append(f"{count} comparisons on {self.device}, "
                     f"{'all ok' if self.ok else 'FAILURES'}; max attention errors: {summary}")
        return lines

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "ok": self.ok,
            "max_errors": self.max_errors,
            "cases": [
                {"case": r.case.name, "dtype": str(r.dtype), "attention_error": r.attention_error,
                 "store_error": r.store_error, "ok": r.ok}
                for r in self.results
            ],
            "add_norm": [
                {"case": r.case.name, "dtype": str(r.dtype), "residual_error": r.residual_error,
                 "norm_error": r.norm_error, "ok": r.ok}
                for r in self.add_norm
            ],
            "rope_store": [
                {"case": r.case.name, "dtype": str(r.dtype), "q_error": r.q_error, "k_error": r.k_error,
                 "v_error": r.v_error, "ok": r.ok}
                for r in self.rope_store
            ],
        }


@dataclass
class Inputs:
    q: torch.Tensor  # (B, n_heads, d)
    k: torch.Tensor  # (B, n_kv, d): the new tokens' keys and values
    v: torch.Tensor
    k_cache: torch.Tensor  # (num_blocks + 1, block_size, n_kv, d)
    v_cache: torch.Tensor
    tables: list[list[int]]  # per sequence, indexed by position // block_size; -1 where the window has left
    slots: torch.Tensor  # (B,) int64: the new tokens' slots
    block_tables: torch.Tensor  # (B, W) int32, padded with the spare block
    context_lens: torch.Tensor  # (B,) int32


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Inputs:
    """Random queries and cache; blocks scattered over the pool; blocks wholly before the window are -1."""
    gen = torch.Generator().manual_seed(seed)
    bs, n_kv, dim = case.block_size, case.n_kv, case.head_dim
    needed = [-(-n // bs) for n in case.lengths]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n, count in zip(case.lengths, needed):
        table = [order.pop() for _ in range(count)]
        if case.window is not None:
            first_block = max(0, n - case.window) // bs
            table[:first_block] = [-1] * first_block
        tables.append(table)
    b = len(case.lengths)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    spare = num_blocks  # like the runner's scratch block: the padding of the tables
    width = max(needed) + 2
    padded = [t + [spare] * (width - len(t)) for t in tables]
    slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, case.lengths)]
    return Inputs(
        q=randn(b, case.n_heads, dim),
        k=randn(b, n_kv, dim),
        v=randn(b, n_kv, dim),
        k_cache=randn(num_blocks + 1, bs, n_kv, dim),
        v_cache=randn(num_blocks + 1, bs, n_kv, dim),
        tables=tables,
        slots=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        context_lens=torch.tensor(case.lengths, dtype=torch.int32, device=device),
    )


@contextmanager
def torch_attention():
    """paged_attention on its torch path, even on CUDA where it would run these kernels."""
    before = os.environ.get("LOCALLLM_NATIVE_ATTENTION")
    os.environ["LOCALLLM_NATIVE_ATTENTION"] = "reference"
    try:
        yield
    finally:
        if before is None:
            del os.environ["LOCALLLM_NATIVE_ATTENTION"]
        else:
            os.environ["LOCALLLM_NATIVE_ATTENTION"] = before


def reference(case: Case, x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference: store the new tokens, then attend (per-sequence spans). (out, k_cache, v_cache)."""
    from native.layers.attention import AttentionBatch, SeqSpan, paged_attention

    k_cache, v_cache = x.k_cache.clone(), x.v_cache.clone()
    spans = [SeqSpan(i, 1, n, t) for i, (n, t) in enumerate(zip(case.lengths, x.tables))]
    batch = AttentionBatch(spans, x.slots, case.block_size, x.q.device)
    with torch_attention():
        out = paged_attention(x.q, x.k, x.v, k_cache, v_cache, batch, window=case.window, scale=case.head_dim**-0.5)
    return out.view_as(x.q), k_cache, v_cache


def run_kernels(case: Case, x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from native.kernels.decode_attention import paged_decode_attention
    from native.kernels.kv_store import store_kv

    k_cache, v_cache = x.k_cache.clone(), x.v_cache.clone()
    store_kv(x.k, x.v, k_cache, v_cache, x.slots)
    out = paged_decode_attention(
        x.q, k_cache, v_cache, x.block_tables, x.context_lens,
        window=case.window, scale=case.head_dim**-0.5, num_splits=case.num_splits,
    )
    return out, k_cache, v_cache


def compare(case: Case, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Result:
    x = make_inputs(case, dtype, device, seed)
    want, want_k, want_v = reference(case, x)
    got, got_k, got_v = run_kernels(case, x)
    attention = float((got.float() - want.float()).abs().max())
    store = max(float((got_k.float() - want_k.float()).abs().max()), float((got_v.float() - want_v.float()).abs().max()))
    return Result(case, dtype, attention, store, TOLERANCE[dtype])


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def compare_add_norm(case: AddNormCase, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> AddNormResult:
    """fused.add_rms_norm against RMSNorm.add_and_norm on its torch path, with random norm weights."""
    from native.layers.norm import RMSNorm
    from native.kernels.fused import add_rms_norm

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)

    def norm(eps: float) -> RMSNorm:
        layer = RMSNorm(case.dim, eps)
        weight = 1 + torch.randn(case.dim, generator=gen) * 0.3
        layer.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
        return layer

    after, before = norm(1e-6), (norm(1e-5) if case.sandwich else None)
    x = (torch.randn(case.rows, case.dim, generator=gen) * 2).to(dtype=dtype, device=device)
    delta = torch.randn(case.rows, case.dim, generator=gen).to(dtype=dtype, device=device)
    with torch_attention():
        want_residual, want_normed = after.add_and_norm(x, delta, delta_norm=before)
    if before is None:
        residual, normed = add_rms_norm(x, delta, after.weight, after.eps)
    else:
        residual, normed = add_rms_norm(x, delta, after.weight, after.eps, before.weight, before.eps)
    # the interpreter truncates to bfloat16 where a GPU rounds to nearest, as torch does
    exact = not case.sandwich and (device.type == "cuda" or dtype == torch.float32)
    return AddNormResult(case, dtype, _relative_error(residual, want_residual), _relative_error(normed, want_normed),
                         TOLERANCE[dtype], exact)


@dataclass
class RopeStoreInputs:
    q: torch.Tensor  # (T, n_heads, d), k and v (T, n_kv, d): strided views of one QKV output, as in the model
    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor  # (T, d) in the model's dtype
    sin: torch.Tensor
    k_cache: torch.Tensor  # (num_blocks + 1, block_size, n_kv, d): the last block is the scratch block
    v_cache: torch.Tensor
    slots: torch.Tensor  # (T,) int64: distinct slots, then the scratch block's first slot for padding rows
    q_norm: object | None  # RMSNorm of the head dim (with its k_norm), or None
    k_norm: object | None


def make_rope_store_inputs(case: RopeStoreCase, dtype: torch.dtype, device: torch.device | str,
                           seed: int = 0) -> RopeStoreInputs:
    """Random heads at random positions (rope base 10,000), norm weights around 1, a random cache."""
    from native.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(seed)
    h, kv, dim, bs = case.n_heads, case.n_kv, case.head_dim, case.block_size
    n = case.tokens + case.padding
    qkv = torch.randn(n, (h + 2 * kv) * dim, generator=gen) * 2
    positions = torch.randint(0, 8192, (n,), generator=gen)
    qkv[case.tokens:], positions[case.tokens:] = qkv[0], 0  # padding rows: one token, position 0
    num_blocks = -(-case.tokens // bs) + 2
    slots = torch.randperm(num_blocks * bs, generator=gen)[: case.tokens]
    slots = torch.cat([slots, torch.full((case.padding,), num_blocks * bs)])
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)

    def norm() -> RMSNorm:
        layer = RMSNorm(dim, 1e-6)
        layer.weight = torch.nn.Parameter((1 + torch.randn(dim, generator=gen) * 0.3).to(device), requires_grad=False)
        return layer

    q, k, v = qkv.to(dtype=dtype, device=device).split((h * dim, kv * dim, kv * dim), dim=-1)
    cache_shape = (num_blocks + 1, bs, kv, dim)
    return RopeStoreInputs(
        q=q.view(n, h, dim), k=k.view(n, kv, dim), v=v.view(n, kv, dim),
        cos=angles.cos().to(dtype=dtype, device=device), sin=angles.sin().to(dtype=dtype, device=device),
        k_cache=torch.randn(cache_shape, generator=gen).to(dtype=dtype, device=device),
        v_cache=torch.randn(cache_shape, generator=gen).to(dtype=dtype, device=device),
        slots=slots.to(device),
        q_norm=norm() if case.qk_norm else None, k_norm=norm() if case.qk_norm else None,
    )


def reference_rope_store(x: RopeStoreInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layers' ops the kernel replaces, on their torch path: q/k norms, rotary, store. (q, k_cache, v_cache)."""
    from native.layers.attention import store_kv
    from native.layers.rotary import apply_rotary

    q, k = x.q, x.k
    k_cache, v_cache = x.k_cache.clone(), x.v_cache.clone()
    with torch_attention():
        if x.q_norm is not None:
            q, k = x.q_norm(q), x.k_norm(k)
        q, k = apply_rotary(q, x.cos, x.sin), apply_rotary(k, x.cos, x.sin)
        store_kv(k, x.v, k_cache, v_cache, x.slots)
    return q, k_cache, v_cache


def run_rope_store(x: RopeStoreInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from native.kernels.rope_store import norm_rope_store

    k_cache, v_cache = x.k_cache.clone(), x.v_cache.clone()
    q = norm_rope_store(x.q, x.k, x.v, x.cos, x.sin, k_cache, v_cache, x.slots, q_norm=x.q_norm, k_norm=x.k_norm)
    return q, k_cache, v_cache


def compare_rope_store(case: RopeStoreCase, dtype: torch.dtype, device: torch.device | str,
                       seed: int = 0) -> RopeStoreResult:
    x = make_rope_store_inputs(case, dtype, device, seed)
    want_q, want_k, want_v = reference_rope_store(x)
    got_q, got_k, got_v = run_rope_store(x)
    v_error = float((got_v.float() - want_v.float()).abs().max())
    return RopeStoreResult(case, dtype, _relative_error(got_q, want_q), _relative_error(got_k, want_k), v_error,
                           TOLERANCE[dtype])


def selfcheck(device: torch.device | str = "cuda", *, cases: tuple[Case, ...] | None = None,
              dtypes: tuple[torch.dtype, ...] | None = None,
              add_norm_cases: tuple[AddNormCase, ...] | None = None,
              rope_store_cases: tuple[RopeStoreCase, ...] | None = None) -> Report:
    """Every case in every dtype (float32 and bfloat16 on CUDA, float32 elsewhere): max errors and a verdict."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    cases = cases if cases is not None else (GPU_CASES if on_gpu else CASES)
    if add_norm_cases is None:
        add_norm_cases = GPU_ADD_NORM_CASES if on_gpu else ADD_NORM_CASES
    if rope_store_cases is None:
        rope_store_cases = GPU_ROPE_STORE_CASES if on_gpu else ROPE_STORE_CASES
    dtypes = dtypes if dtypes is not None else ((torch.float32, torch.bfloat16) if on_gpu else (torch.float32,))
    report = Report(torch.cuda.get_device_name(device) if on_gpu else str(device))
    for dtype in dtypes:
        for i, case in enumerate(cases):
            report.results.append(compare(case, dtype, device, seed=i))
        for i, norm_case in enumerate(add_norm_cases):
            report.add_norm.append(compare_add_norm(norm_case, dtype, device, seed=i))
        for i, rope_case in enumerate(rope_store_cases):
            report.rope_store.append(compare_rope_store(rope_case, dtype, device, seed=i))
    return report


# -- timing --------------------------------------------------------------------------------

TIMING_SHAPES = {
    "Llama-3.2-1B (32q/8kv, d64)": (32, 8, 64),
    "Qwen2.5-7B (28q/4kv, d128)": (28, 4, 128),
}


def _cuda_ms(fn, *, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_decode_attention(device: torch.device | str = "cuda", *, batches: tuple[int, ...] = (64, 1),
                          context: int = 2048, block_size: int = 16, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """One layer's decode attention: kernel vs the torch paths, median of 20 (CUDA events).

    Bandwidth counts the K and V bytes the step must read (B x context x n_kv x d x 2 x bytes).
    """
    from native.layers.attention import AttentionBatch, DecodeMeta, SeqSpan, decode_attention, paged_attention
    from native.kernels.decode_attention import default_splits, paged_decode_attention

    device = torch.device(device)
    lines = []
    for name, (n_heads, n_kv, dim) in TIMING_SHAPES.items():
        for b in batches:
            case = Case(n_heads, n_kv, dim, block_size, (context,) * b)
            x = make_inputs(case, dtype, device)
            scale = dim**-0.5
            meta = DecodeMeta(x.block_tables, x.context_lens)
            spans = [SeqSpan(i, 1, context, t) for i, t in enumerate(x.tables)]
            batch = AttentionBatch(spans, x.slots, block_size, device)
            kernel = _cuda_ms(lambda: paged_decode_attention(x.q, x.k_cache, x.v_cache, x.block_tables, x.context_lens,
                                                              window=None, scale=scale))
            dense = _cuda_ms(lambda: decode_attention(x.q, x.k_cache, x.v_cache, meta, window=None, scale=scale))
            with torch_attention():
                gather = _cuda_ms(lambda: paged_attention(x.q, x.k, x.v, x.k_cache, x.v_cache, batch, window=None, scale=scale))
            read = b * context * n_kv * dim * 2 * x.k_cache.element_size()
            splits = default_splits(b, n_kv, x.block_tables.shape[1] * block_size, device)
            lines.append(
                f"{name}, {b} x {context} ctx, {str(dtype).replace('torch.', '')}: kernel {kernel * 1e3:.0f} us "
                f"({read / kernel / 1e6:.0f} GB/s, {splits} split{'s' if splits > 1 else ''}); "
                f"torch tensor-meta path {dense * 1e3:.0f} us ({dense / kernel:.1f}x); "
                f"torch gather path {gather * 1e3:.0f} us ({gather / kernel:.1f}x)"
            )
            del x
    return lines


def verify_fusions(config, dtype, device) -> str | None:
    """Run the fused kernels once at the model's own shapes and compare them with torch; None if they hold.

    They are tested on CPUs under Triton's interpreter, and a GPU's compiler
    may see them differently: a kernel that fails to compile, or computes
    something else, switches the fusions off for this process (the engine
    then runs the separate kernels) instead of taking the engine down.
    Returns why they were switched off. The shapes are the model's, so the
    compiled kernels are the ones its steps use.
    """
    if not kernels.fusions_on():
        return kernels.fusions_off_reason()
    gemma = config.family == "gemma3"  # its blocks' outputs are normed before the add
    try:
        results = [
            compare_add_norm(AddNormCase(2, config.hidden_size, sandwich=gemma), dtype, device),
            compare_rope_store(RopeStoreCase(2, config.n_heads, config.n_kv_heads, config.head_dim,
                                             qk_norm=config.qk_norm, padding=1), dtype, device),
        ]
        wrong = [r.case.name for r in results if not r.ok]
        if wrong:
            kernels.switch_fusions_off(f"{wrong[0]} gave results that differ from torch's")
    except Exception as exc:  # a compiler error, an unsupported construct on this GPU
        kernels.switch_fusions_off(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    return kernels.fusions_off_reason()
