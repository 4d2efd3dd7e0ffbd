"""The Triton kernels (native/kernels/) against the torch reference, under Triton's interpreter.

There is no GPU here, so the kernels run in Triton's interpreter (switched on
by tests/triton_preamble.py, imported first). The kernels are written
for real GPUs (power-of-two blocks, tl.dot with at least 16 rows); the GPU
check script runs the same comparisons on CUDA in float32 and bfloat16
(`native.kernel_check.selfcheck`). Shapes stay small: the interpreter runs every
program in Python.
"""

from __future__ import annotations

import triton_preamble  # noqa: F401  (first: Triton's interpreter on, before the kernels load)

import os
import random

import pytest
import torch

from native import kernels
from native.kernel_check import CASES, Case, compare, make_inputs, selfcheck
from native.layers.attention import AttentionBatch, DecodeMeta, SeqSpan, paged_attention
from builders import save_tiny, tiny_config

FP32_TOLERANCE = 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decode_kernel_and_store_kernel_match_the_reference(case):
    result = compare(case, torch.float32, "cpu")
    assert result.store_error == 0.0
    assert result.attention_error < FP32_TOLERANCE


def _random_cases(n: int) -> list[Case]:
    """GQA 1/4/8, block sizes 16/32, windows or none, ragged lengths, split-K: drawn from a fixed seed."""
    rng = random.Random(1234)
    cases = []
    for _ in range(n):
        n_kv = rng.choice([1, 2])
        group = rng.choice([1, 4, 8])
        lengths = tuple(rng.randint(1, 160) for _ in range(rng.randint(1, 4)))
        window = rng.choice([None, rng.randint(1, max(lengths))])
        cases.append(Case(group * n_kv, n_kv, rng.choice([16, 32, 64]), rng.choice([16, 32]), lengths, window,
                          rng.choice([1, 2, 4])))
    return cases


@pytest.mark.parametrize("case", _random_cases(8), ids=lambda c: c.name)
def test_decode_kernel_on_random_shapes(case):
    result = compare(case, torch.float32, "cpu", seed=7)
    assert result.store_error == 0.0
    assert result.attention_error < FP32_TOLERANCE


def test_every_split_count_gives_the_same_answer():
    base = Case(8, 2, 32, 16, (3, 130, 250), window=None)
    x = make_inputs(base, torch.float32, "cpu")
    outs = [
        kernels.paged_decode_attention(x.q, x.k_cache, x.v_cache, x.block_tables, x.context_lens,
                                       window=None, scale=0.2, num_splits=s)
        for s in (1, 2, 8)
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


def test_store_kernel_writes_nothing_for_negative_slots():
    k_cache = torch.zeros(4, 16, 2, 32)
    v_cache = torch.zeros(4, 16, 2, 32)
    k, v = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    kernels.store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 40]))
    assert torch.equal(k_cache[0, 5], k[0]) and torch.equal(v_cache[2, 8], v[2])
    assert int((k_cache != 0).any(dim=(2, 3)).sum()) == 2  # slots 5 and 40 only


def test_selfcheck_reports_max_errors_and_a_verdict():
    report = selfcheck("cpu", cases=CASES[:2])
    assert report.ok and len(report.results) == 2
    assert report.max_errors["float32"] < FP32_TOLERANCE
    assert "all ok" in report.lines()[-1]
    assert report.as_dict()["ok"] is True


# -- the dispatcher in native/layers/attention.py ----------------------------------------------


def _mixed_batch(window):
    """Two decoding sequences and a prompt chunk over a cached prefix, in one flat batch."""
    gen = torch.Generator().manual_seed(3)
    bs, n_kv, n_heads, dim = 16, 2, 8, 32
    k_cache = torch.randn(20, bs, n_kv, dim, generator=gen)
    v_cache = torch.randn(20, bs, n_kv, dim, generator=gen)
    tables = [[3, 7, 1], [0, 9, 12, 4, 2], [5, 6, 8, 10]]
    spans = [SeqSpan(0, 1, 40, tables[0]), SeqSpan(1, 10, 70, tables[1]), SeqSpan(11, 1, 55, tables[2])]
    positions = [39] + list(range(60, 70)) + [54]
    table_of = [0] + [1] * 10 + [2]
    slots = torch.tensor([tables[t][p // bs] * bs + p % bs for t, p in zip(table_of, positions)])
    q = torch.randn(12, n_heads, dim, generator=gen)
    k = torch.randn(12, n_kv, dim, generator=gen)
    v = torch.randn(12, n_kv, dim, generator=gen)
    return q, k, v, k_cache, v_cache, spans, slots


@pytest.mark.parametrize("window", [None, 20])
def test_paged_attention_uses_the_kernel_for_decode_rows_of_a_mixed_step(monkeypatch, window):
    q, k, v, k_cache, v_cache, spans, slots = _mixed_batch(window)
    results = {}
    for choice in ("reference", "triton"):
        monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", choice)
        kc, vc = k_cache.clone(), v_cache.clone()
        batch = AttentionBatch(spans, slots, 16, torch.device("cpu"))
        results[choice] = (paged_attention(q, k, v, kc, vc, batch, window=window, scale=0.17), kc)
    torch.testing.assert_close(results["triton"][0], results["reference"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(results["triton"][1], results["reference"][1])


def test_paged_attention_uses_the_kernel_for_decode_meta_steps(monkeypatch):
    case = Case(8, 2, 32, 16, (9, 50, 33), window=24)
    x = make_inputs(case, torch.float32, "cpu")
    meta = DecodeMeta(x.block_tables, x.context_lens)
    outs = {}
    for choice in ("reference", "triton"):
        monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", choice)
        batch = AttentionBatch([], x.slots, 16, torch.device("cpu"), decode_meta=meta)
        outs[choice] = paged_attention(x.q, x.k, x.v, x.k_cache.clone(), x.v_cache.clone(), batch, window=24, scale=0.2)
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-5, atol=1e-5)


def test_kernels_stay_off_on_the_cpu_unless_forced(monkeypatch):
    from native.layers.attention import _kernels

    monkeypatch.delenv("LOCALLLM_NATIVE_ATTENTION", raising=False)
    assert _kernels(torch.zeros(1)) is None
    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "triton")
    assert _kernels(torch.zeros(1)) is kernels


def test_engine_with_a_sliding_pool_decodes_through_the_kernels_as_through_the_reference(monkeypatch, tmp_path):
    """A tiny Gemma 3 (global and sliding pools, so two block tables) run end to end with the kernels forced."""
    from localllm.core.requests import SamplingParams
    from native.engine import EngineOptions, LLMEngine

    save_tiny(tiny_config("gemma3"), tmp_path)  # skips where transformers is missing
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 13)]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    runs = {}
    for choice in ("reference", "triton"):
        monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", choice)
        engine = LLMEngine(tmp_path, EngineOptions(device="cpu", load_tokenizer=False, block_size=4, max_num_seqs=2,
                                                   max_num_batched_tokens=16, threads=1, weights="float32"))
        assert [g.window for g in engine.runner.kv_groups] == [None, 8]
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        steps = []
        while engine.has_work():
            steps += [(o.request_id, o.token, [lp for _, lp in o.logprobs.top]) for o in engine.step()]
        runs[choice] = steps
        assert engine.blocks.num_free == engine.blocks.num_blocks
    assert [s[:2] for s in runs["triton"]] == [s[:2] for s in runs["reference"]]
    for got, want in zip(runs["triton"], runs["reference"]):  # decode-step logits through the kernels
        assert got[2] == pytest.approx(want[2], abs=1e-4)


def test_the_reference_of_the_comparisons_stays_the_torch_path(monkeypatch):
    """Where the dispatcher would pick the kernels (CUDA, or forced), the selfcheck's reference must not."""
    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "triton")
    from native import kernel_check as check

    used = []
    real = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a, **k: used.append(1) or real(*a, **k))
    case = CASES[0]
    check.reference(case, make_inputs(case, torch.float32, "cpu"))
    assert not used
    assert os.environ["LOCALLLM_NATIVE_ATTENTION"] == "triton"
