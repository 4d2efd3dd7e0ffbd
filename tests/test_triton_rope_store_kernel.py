"""The decode step's q/k norm + rotary + KV-store Triton kernel, and the layer path that uses it, interpreted.

Like tests/test_triton_fused_kernels.py this runs under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernels are imported). The kernel is
compared with the layers' torch ops it replaces (RMSNorm of each head,
rotary, store_kv); then one attention layer with a sliding pool of its own,
and tiny random Llama, Qwen3 and Gemma 3 engines, decode with the kernels
forced (LOCALLLM_NATIVE_ATTENTION=triton) and the fusions on and off
(LOCALLLM_NATIVE_FUSED): same tokens, same logits.
"""

from __future__ import annotations

import triton_preamble  # noqa: F401  (first: Triton's interpreter on, before the kernels load)

import pytest
import torch

from native import kernels
from native.kernels import fused, rope_store
from native.kernel_check import (
    ROPE_STORE_CASES, RopeStoreCase, compare_rope_store, make_rope_store_inputs, reference_rope_store,
    run_rope_store, selfcheck,
)
from native.layers.attention import AttentionBatch, DecodeMeta, SeqSpan, fused_decode_kernels
from builders import tiny_model

FP32_TOLERANCE = 1e-5
# The interpreter's cast to bfloat16 truncates where a GPU rounds to nearest (see
# tests/test_triton_add_norm_kernel.py), and the torch rotary rounds after each
# bfloat16 op: a few bfloat16 steps (2**-7 relative) apart, relative to the largest value.
BF16_TOLERANCE = 2e-2


def _cases() -> list[RopeStoreCase]:
    """GQA 1/4/8 at head dims 64/128/256, each with and without q/k norms; then the selfcheck's own cases."""
    shapes = [(2, 2, 64), (8, 2, 128), (8, 1, 256)]
    grid = [RopeStoreCase(2, h, kv, d, qk_norm=norm) for h, kv, d in shapes for norm in (False, True)]
    return grid + list(ROPE_STORE_CASES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.name)
def test_norm_rope_store_kernel_matches_the_layers(case, dtype):
    result = compare_rope_store(case, dtype, "cpu", seed=3)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    assert result.q_error <= tolerance and result.k_error <= tolerance, result.line()
    assert result.v_error == 0.0, result.line()


def test_norm_rope_store_kernel_writes_only_the_new_slots_and_returns_a_fresh_query():
    """Every other slot of both caches keeps its bits; the QKV output the views come from is not written."""
    x = make_rope_store_inputs(RopeStoreCase(3, 8, 2, 64, qk_norm=True, padding=2), torch.float32, "cpu", seed=5)
    before_q = x.q.clone()
    q, k_cache, v_cache = run_rope_store(x)
    assert torch.equal(x.q, before_q) and q.is_contiguous() and q.data_ptr() != x.q.data_ptr()
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    written[x.slots] = True
    written = written.view(k_cache.shape[:2])
    assert torch.equal(k_cache[~written], x.k_cache[~written]) and torch.equal(v_cache[~written], x.v_cache[~written])
    assert not torch.equal(k_cache[written], x.k_cache[written])
    scratch = k_cache.shape[0] - 1  # padding rows: all into the scratch block's first slot, nowhere else
    assert written[scratch].tolist() == [True] + [False] * (k_cache.shape[1] - 1)
    assert torch.equal(v_cache[scratch, 0], x.v[0])  # a padding row repeats token 0


def test_norm_rope_store_kernel_stores_nothing_for_a_negative_slot():
    x = make_rope_store_inputs(RopeStoreCase(3, 4, 2, 32), torch.float32, "cpu", seed=6)
    want_q, _, _ = reference_rope_store(x)  # the torch store has no "no slot": its queries, with every slot valid
    x.slots[1] = -1
    q, k_cache, v_cache = run_rope_store(x)
    torch.testing.assert_close(q, want_q, rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE)  # its query is still rotated
    changed = (k_cache != x.k_cache).any(dim=(2, 3)) | (v_cache != x.v_cache).any(dim=(2, 3))
    assert int(changed.sum()) == 2


def test_norm_rope_store_kernel_refuses_half_a_pair_of_norms():
    x = make_rope_store_inputs(RopeStoreCase(1, 2, 1, 32, qk_norm=True), torch.float32, "cpu")
    with pytest.raises(ValueError, match="together"):
        rope_store.norm_rope_store(x.q, x.k, x.v, x.cos, x.sin, x.k_cache, x.v_cache, x.slots, q_norm=x.q_norm)


def test_selfcheck_reports_norm_rope_store_kernel_cases():
    report = selfcheck("cpu", cases=(), add_norm_cases=(), rope_store_cases=ROPE_STORE_CASES[:2])
    assert len(report.rope_store) == 2 and all(r.ok for r in report.rope_store)
    assert "norm+rotary+store" in report.lines()[0]
    assert len(report.as_dict()["rope_store"]) == 2


# -- the choice of path -----------------------------------------------------------------------


def _decode_batch(meta: bool) -> AttentionBatch:
    slots = torch.tensor([5])
    if meta:
        return AttentionBatch([], slots, 4, torch.device("cpu"),
                              decode_meta=DecodeMeta(torch.tensor([[1, 0]], dtype=torch.int32),
                                                     torch.tensor([6], dtype=torch.int32)))
    return AttentionBatch([SeqSpan(0, 1, 6, [1, 0])], slots, 4, torch.device("cpu"))


def test_the_fused_decode_kernel_is_picked_only_for_forced_decode_meta_steps_with_fusions_on(monkeypatch):
    q = torch.zeros(1, 2, 8)
    monkeypatch.delenv("LOCALLLM_NATIVE_FUSED", raising=False)
    monkeypatch.delenv("LOCALLLM_NATIVE_ATTENTION", raising=False)
    assert fused_decode_kernels(q, _decode_batch(meta=True)) is None  # the CPU keeps the torch path
    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "triton")
    assert fused_decode_kernels(q, _decode_batch(meta=True)) is kernels
    assert fused_decode_kernels(q, _decode_batch(meta=False)) is None  # span steps (prompt chunks, mixed) keep theirs
    for off in ("off", "OFF", "0"):
        monkeypatch.setenv("LOCALLLM_NATIVE_FUSED", off)
        assert not kernels.fusions_on()
        assert fused_decode_kernels(q, _decode_batch(meta=True)) is None
    monkeypatch.setenv("LOCALLLM_NATIVE_FUSED", "on")
    assert kernels.fusions_on()


def test_fusions_off_keeps_add_and_norm_to_the_separate_ops(monkeypatch):
    from native.layers.norm import RMSNorm

    norm = RMSNorm(16, 1e-6)
    norm.weight = torch.nn.Parameter(torch.rand(16) + 0.5, requires_grad=False)
    x, delta = torch.randn(2, 16), torch.randn(2, 16)
    calls = []
    real = fused.add_rms_norm
    monkeypatch.setattr(fused, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "triton")
    monkeypatch.setenv("LOCALLLM_NATIVE_FUSED", "off")
    residual, normed = norm.add_and_norm(x, delta)
    assert not calls
    assert torch.equal(residual, x + delta) and torch.equal(normed, norm(x + delta))
    monkeypatch.setenv("LOCALLLM_NATIVE_FUSED", "on")
    norm.add_and_norm(x, delta)
    assert len(calls) == 1


# -- in the models ------------------------------------------------------------------------------


def _engine(arch: str, monkeypatch):
    from native.engine import EngineOptions, LLMEngine
    from native.loader import from_state_dict

    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "triton")  # before the engine: its decode steps get a DecodeMeta
    model, config = tiny_model(arch)
    weights = from_state_dict(config.to_dict(), dict(model.state_dict()))
    engine = LLMEngine(weights, EngineOptions(device="cpu", load_tokenizer=False, block_size=4, max_num_seqs=2,
                                              max_num_batched_tokens=16, threads=1, prefix_caching=False, weights="float32"))
    # The runner describes decode-only steps by a DecodeMeta where the decode kernel runs, which on
    # its own it decides only on CUDA: told so here, its steps take the GPU's path (without graphs).
    engine.runner.decode_kernel = True
    return engine, config


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_engines_decode_the_same_with_the_fused_kernels_on_and_off(monkeypatch, arch):
    """Greedy tokens equal, every step's logits within float32 rounding; the kernel ran on decode steps only."""
    from localllm.core.requests import SamplingParams

    engine, config = _engine(arch, monkeypatch)
    if arch == "gemma3":  # contexts past the window: the sliding layers keep their own pool and slots
        assert [g.window for g in engine.runner.kv_groups] == [None, 8]
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (13, 6)]
    greedy = SamplingParams(temperature=0, max_tokens=5)
    model = engine.runner.model
    calls = []
    real = rope_store.norm_rope_store
    monkeypatch.setattr(rope_store, "norm_rope_store", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for fusions in ("on", "off"):
        monkeypatch.setenv("LOCALLLM_NATIVE_FUSED", fusions)
        logits = []
        real_logits = type(model).compute_logits
        monkeypatch.setattr(model, "compute_logits", lambda h: logits.append(real_logits(model, h)) or logits[-1])
        calls.clear()
        tokens = engine.generate(prompts, greedy)
        runs[fusions] = tokens, logits, len(calls)
        assert engine.blocks.num_used == 0
    (tokens_on, logits_on, calls_on), (tokens_off, logits_off, calls_off) = runs["on"], runs["off"]
    assert tokens_on == tokens_off and all(len(t) == 5 for t in tokens_on)
    assert len(logits_on) == len(logits_off)
    for got, want in zip(logits_on, logits_off):
        torch.testing.assert_close(got, want, rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE)
    assert calls_off == 0
    assert calls_on >= 4 * config.num_hidden_layers and calls_on % config.num_hidden_layers == 0


def test_a_sliding_layer_stores_into_its_own_pool_through_the_fused_kernel(monkeypatch):
    """A Gemma 3 sliding layer on a DecodeMeta step with two pools: the kernel writes the sliding slots.

    The layer runs once with the fusions on and once off, each on its own copy of
    the caches: same output, same caches; and the new keys sit at the sliding
    slots (the global ones would be other blocks), the padding row's at the scratch block.
    """
    engine, _ = _engine("gemma3", monkeypatch)
    model = engine.runner.model
    attn = model.layers[0].self_attn
    assert attn.window == 8
    gen = torch.Generator().manual_seed(4)
    bs, n_kv, dim, num_blocks = 4, attn.n_kv, attn.dim, 12
    scratch = num_blocks
    positions = torch.tensor([9, 3, 0])  # two sequences and a padding row (token 0 at position 0)
    global_tables = torch.tensor([[0, 1, 2], [3, scratch, scratch], [scratch] * 3], dtype=torch.int32)
    sliding_tables = torch.tensor([[5, 6, 7], [8, scratch, scratch], [scratch] * 3], dtype=torch.int32)
    global_slots = torch.tensor([2 * bs + 1, 3 * bs + 3, scratch * bs])
    sliding_slots = torch.tensor([7 * bs + 1, 8 * bs + 3, scratch * bs])
    meta = DecodeMeta(global_tables, (positions + 1).to(torch.int32), sliding_block_tables=sliding_tables)
    batch = AttentionBatch([], global_slots, bs, torch.device("cpu"), decode_meta=meta,
                           sliding_slot_mapping=sliding_slots)
    h = torch.randn(3, model.config.hidden_size, generator=gen)
    rope = {key: r.cos_sin(positions, torch.float32) for key, r in model.rotary.items()}
    caches = torch.randn(2, num_blocks + 1, bs, n_kv, dim, generator=gen)
    bound = attn.k_cache, attn.v_cache
    results = {}
    try:
        for fusions in ("on", "off"):
            monkeypatch.setenv("LOCALLLM_NATIVE_FUSED", fusions)
            assert (fused_decode_kernels(h, batch) is not None) == (fusions == "on")
            attn.k_cache, attn.v_cache = caches[0].clone(), caches[1].clone()
            with torch.inference_mode():
                out = attn(h, rope, batch)
            results[fusions] = out, attn.k_cache, attn.v_cache
    finally:
        attn.k_cache, attn.v_cache = bound
    (out_on, k_on, v_on), (out_off, k_off, v_off) = results["on"], results["off"]
    torch.testing.assert_close(out_on, out_off, rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE)
    torch.testing.assert_close(k_on, k_off, rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE)
    assert torch.equal(v_on, v_off)
    changed = (k_on != caches[0]).any(dim=(2, 3)).flatten().nonzero().flatten().tolist()
    assert changed == sorted(sliding_slots.tolist())


def test_triton_fusions_checked_at_start_switch_themselves_off_when_broken(monkeypatch):
    """A fused kernel that fails on a GPU's compiler, or computes something else, must not take the engine down."""
    from dataclasses import replace

    from localllm.core.model_config import ModelConfig, RopeSpec
    from native import kernel_check as check

    base = dict(vocab_size=64, hidden_size=96, intermediate_size=128, n_layers=1, n_kv_heads=2, head_dim=32,
                rms_norm_eps=1e-6, max_position=128, rope=RopeSpec(theta=10000.0))
    llama = ModelConfig("llama", "llama", n_heads=4, **base)
    gemma = replace(ModelConfig("gemma3", "gemma3", n_heads=4, **base), qk_norm=True)
    kernels.switch_fusions_off(None)
    assert check.verify_fusions(llama, torch.float32, "cpu") is None
    assert check.verify_fusions(gemma, torch.float32, "cpu") is None and kernels.fusions_on()

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nmore lines")

    rope_store_check = check.compare_rope_store
    monkeypatch.setattr(check, "compare_rope_store", broken)
    assert check.verify_fusions(llama, torch.float32, "cpu") == "RuntimeError: PassManager::run failed"
    assert not kernels.fusions_on()
    kernels.switch_fusions_off(None)
    monkeypatch.setattr(check, "compare_rope_store", rope_store_check)

    real = check.compare_add_norm
    monkeypatch.setattr(check, "compare_add_norm", lambda *a, **k: replace(real(*a, **k), norm_error=1.0))
    assert "differ from torch" in check.verify_fusions(llama, torch.float32, "cpu")
    assert not kernels.fusions_on()
    kernels.switch_fusions_off(None)
