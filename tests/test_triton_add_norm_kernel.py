"""The residual add + RMSNorm Triton kernel, and the decoder layers that pass (stream, normed) pairs, interpreted.

Like tests/test_triton_fused_kernels.py this runs under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernels are imported). The kernel is
compared with the torch layers it replaces; then tiny random Llama and Gemma 3
models run their prompt through the engine with the fused add-norms forced on
(LOCALLLM_NATIVE_ATTENTION=triton) and off, which pins the wiring: which norm
weight goes with which add, and the last layer's add with the final norm.
"""

from __future__ import annotations

import triton_preamble  # noqa: F401  (first: Triton's interpreter on, before the kernels load)

import os

import pytest
import torch

from native.kernels import fused, fused_for
from native.kernel_check import ADD_NORM_CASES, AddNormResult, compare_add_norm, selfcheck
from native.layers.norm import RMSNorm
from builders import tiny_model

GEN = torch.Generator().manual_seed(0)


def _norm(dim: int, eps: float = 1e-6) -> RMSNorm:
    norm = RMSNorm(dim, eps)
    norm.weight = torch.nn.Parameter(1 + torch.randn(dim, generator=GEN) * 0.3, requires_grad=False)
    return norm


def _reference(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm,
               delta_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' torch path, spelt out: the add (of the normalised delta, for Gemma), then the norm."""
    residual = x + (delta if delta_norm is None else delta_norm(delta))
    return residual, norm(residual)


def _kernel(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm,
            delta_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    if delta_norm is None:
        return fused.add_rms_norm(x, delta, norm.weight, norm.eps)
    return fused.add_rms_norm(x, delta, norm.weight, norm.eps, delta_norm.weight, delta_norm.eps)


@pytest.mark.parametrize("sandwich", [False, True], ids=["plain", "sandwich"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dim", [640, 1000, 2048])
def test_add_rms_norm_kernel_matches_the_layers_in_float32(dim, rows, sandwich):
    norm = _norm(dim)
    delta_norm = _norm(dim, eps=1e-3) if sandwich else None  # its own eps, large enough to show if it is ignored
    x = torch.randn(rows, dim, generator=GEN) * 3
    delta = torch.randn(rows, dim, generator=GEN)
    residual, normed = _kernel(x, delta, norm, delta_norm)
    want_residual, want_normed = _reference(x, delta, norm, delta_norm)
    if sandwich:
        torch.testing.assert_close(residual, want_residual, rtol=1e-5, atol=1e-5)
    else:  # one float32 add, as torch's: the same bits
        assert torch.equal(residual, want_residual)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sandwich", [False, True], ids=["plain", "sandwich"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dim", [640, 1000, 2048])
def test_add_rms_norm_kernel_rounds_to_bfloat16_within_a_step(dim, rows, sandwich):
    """bfloat16 in and out, float32 inside.

    The interpreter's cast to bfloat16 truncates where a GPU rounds to nearest,
    so here the sum may be one bfloat16 step (2**-7 relative) off torch's and
    the norm of it two: hence rtol 2e-2. In the sandwich form the normalised
    delta (below 8) is rounded before the add, one step of it is 2**-5: where
    x nearly cancels it, that step is all of the difference, hence atol 2**-5.
    The GPU check asks for the same bits as torch in the plain form.
    """
    norm = _norm(dim)
    delta_norm = _norm(dim) if sandwich else None
    x = (torch.randn(rows, dim, generator=GEN) * 3).bfloat16()
    delta = torch.randn(rows, dim, generator=GEN).bfloat16()
    residual, normed = _kernel(x, delta, norm, delta_norm)
    want_residual, want_normed = _reference(x, delta, norm, delta_norm)
    assert residual.dtype == normed.dtype == torch.bfloat16
    torch.testing.assert_close(residual.float(), want_residual.float(), rtol=2e-2, atol=2**-5)
    torch.testing.assert_close(normed.float(), want_normed.float(), rtol=2e-2, atol=2**-5)


def test_add_rms_norm_kernel_reads_strided_rows():
    """Rows of a wider tensor (a stride larger than the hidden size) are read where they lie."""
    dim = 96
    norm, delta_norm = _norm(dim), _norm(dim)
    x = torch.randn(4, dim + 32, generator=GEN)[:, :dim]
    delta = torch.randn(4, 2 * dim, generator=GEN)[:, dim:]
    for post in (None, delta_norm):
        got, want = _kernel(x, delta, norm, post), _reference(x, delta, norm, post)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_add_and_norm_takes_the_kernel_when_forced_and_torch_otherwise(monkeypatch):
    """RMSNorm.add_and_norm: the kernel under LOCALLLM_NATIVE_ATTENTION=triton, the torch ops under =reference."""
    norm, delta_norm = _norm(64), _norm(64)
    x, delta = torch.randn(3, 64, generator=GEN), torch.randn(3, 64, generator=GEN)
    calls = []
    real = fused.add_rms_norm
    monkeypatch.setattr(fused, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for choice in ("reference", "triton"):
        monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", choice)
        results[choice] = norm.add_and_norm(x, delta), norm.add_and_norm(x, delta, delta_norm=delta_norm)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(results["reference"][0], _reference(x, delta, norm, None)))
    assert all(torch.equal(a, b) for a, b in zip(results["reference"][1], _reference(x, delta, norm, delta_norm)))
    torch.testing.assert_close(results["triton"], results["reference"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ADD_NORM_CASES, ids=lambda c: c.name)
def test_selfcheck_add_norm_kernel_cases_pass_here(case):
    """The GPU check's comparisons, here in float32: the plain sum must be torch's bits."""
    result = compare_add_norm(case, torch.float32, "cpu")
    assert result.ok, result.line()
    assert result.exact_residual == (not case.sandwich)


def test_selfcheck_reference_for_the_add_norm_kernel_stays_the_torch_path(monkeypatch):
    """Where the kernel would be picked (CUDA, or forced), the comparison's reference must not pick it."""
    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "triton")
    calls = []
    real = fused.add_rms_norm
    monkeypatch.setattr(fused, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    compare_add_norm(ADD_NORM_CASES[-1], torch.float32, "cpu")
    assert len(calls) == 1  # the kernel under test, and only it
    assert os.environ["LOCALLLM_NATIVE_ATTENTION"] == "triton"


def test_selfcheck_reports_add_norm_kernel_failures():
    """A kernel result off by more than the tolerance, or a plain sum not bit-equal, is reported as bad."""
    case = ADD_NORM_CASES[0]
    assert not AddNormResult(case, torch.float32, 0.0, 1e-3, 1e-4, exact_residual=True).ok
    assert not AddNormResult(case, torch.float32, 1e-7, 0.0, 1e-4, exact_residual=True).ok
    assert AddNormResult(case, torch.float32, 1e-7, 1e-5, 1e-4, exact_residual=False).ok
    report = selfcheck("cpu", cases=(), add_norm_cases=ADD_NORM_CASES[:1])
    assert len(report.add_norm) == 1 and "add+RMSNorm" in report.lines()[0]


# -- the wiring in the models --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_models_give_the_same_logits_with_the_add_norm_kernel_forced_on_and_off(monkeypatch, arch):
    from native.engine import EngineOptions, LLMEngine
    from native.loader import from_state_dict

    model, config = tiny_model(arch)
    weights = from_state_dict(config.to_dict(), dict(model.state_dict()))
    engine = LLMEngine(weights, EngineOptions(device="cpu", load_tokenizer=False, block_size=4, max_num_seqs=1,
                                              threads=1, prefix_caching=False, weights="float32"))
    prompt = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    calls = []
    real = fused.add_rms_norm
    monkeypatch.setattr(fused, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = {}
    for choice in ("reference", "triton"):
        monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", choice)
        assert (fused_for(torch.zeros(1)) is not None) == (choice == "triton")
        logits[choice] = engine.prompt_logits(prompt)
    assert len(calls) == 2 * config.num_hidden_layers  # every residual add went through the kernel, once
    assert logits["reference"].isfinite().all()
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-5, atol=1e-5)
