"""The streaming loader: what it reads, what it costs in host memory, and the --weights plumbing.

A load allocates each parameter once and fills it a slice of rows at a time,
so the host's peak is the resident weights plus a small working buffer
(localllm.core.weight_formats.LOAD_WORKING_BYTES); the old loader held every tensor
in float32 at once (the starter's embedding table alone is 671 MB so). The
peak is measured in a fresh process, from the kernel's own high-water mark.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localllm.core.errors import BadModelFile, BadRequest
from native import tensor_source
from native.engine import EngineOptions, LLMEngine
from native.gguf_dequant import dequantize
from native.loader import (dominant_linear_type, load_config, load_weights, load_working_bytes, resolve_precision,
                           resolve_weights)
from localllm.core.weight_formats import LOAD_WORKING_BYTES

REPO = Path(__file__).resolve().parent.parent
MB = 2**20
# What a fresh process gains beyond the weights and the working buffer: torch's kernels paged in on
# first use, the allocator's slack, the header's Python objects (measured: about 45 MB on the starter).
MARGIN = 64 * MB

BENCHMARK = REPO / "benchmarks" / "loader_memory.py"  # its probe loads in a fresh process and reads /proc


def _measure(path: Path, weights: str) -> dict:
    result = subprocess.run([sys.executable, str(BENCHMARK), "--probe", str(path), "--weights", weights],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the kernel's high-water mark")
EMBEDDING_F32 = 262_144 * 640 * 4  # what the old loader held for the starter's table alone


def _report(weights: str, m: dict, working: int) -> None:
    print(f"{weights}: peak {m['peak'] / MB:.0f} MB over the start, resident weights {m['resident'] / MB:.0f} MB, "
          f"after {m['after'] / MB:.0f} MB; working allowance {working / MB:.0f} MB")


@needs_proc
def test_loading_the_starter_needs_its_weights_plus_a_small_working_buffer(starter_gguf):
    m = _measure(starter_gguf, "bfloat16")
    _report("bfloat16", m, LOAD_WORKING_BYTES)
    assert m["resident"] > 500 * MB  # bfloat16 weights of 268M parameters (and the norms in float32)
    assert m["peak"] <= m["resident"] + LOAD_WORKING_BYTES + MARGIN
    assert m["peak"] - m["resident"] < EMBEDDING_F32 / 4


@needs_proc
def test_an_int4_load_peaks_at_its_weights_plus_the_largest_table_unpacked(starter_gguf):
    """int4 holds one matrix's unpacked values while packing it (the table: a byte per value plus scales)."""
    working = load_working_bytes(load_config(starter_gguf), "int4")
    m = _measure(starter_gguf, "int4")
    _report("int4", m, working)
    assert m["resident"] < 320 * MB  # 4-bit table (gathered and multiplied: two packings) and layers
    assert m["peak"] <= m["resident"] + working + MARGIN
    assert m["peak"] < EMBEDDING_F32  # less than the old loader's float32 table alone


def test_slices_equal_the_whole_tensor_dequantized(starter_gguf, monkeypatch):
    """Every starter tensor read slice by slice equals its whole dequantization (Gemma norms less 1)."""
    monkeypatch.setattr(tensor_source, "SLICE_BYTES", 1 << 18)  # many slices per tensor
    loaded = load_weights(starter_gguf)
    source = loaded.tensors
    assert len(source.names()) == 236
    seen_types = set()
    for name in source.names():
        whole = dequantize(source.raw(name).clone(), source.type_name(name), source.shape(name), name=name)
        if name.endswith("norm.weight"):
            whole = whole - 1.0
        assert torch.equal(source.read(name, torch.float32), whole), name
        seen_types.add(source.type_name(name))
    source.close()
    assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"} <= seen_types


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_one_head_per_slice_loads_like_the_checkpoint(tmp_path, monkeypatch, kind):
    """Slices as small as they get (a head of Q/K, a row elsewhere), through llama.cpp's Q/K row order too."""
    pytest.importorskip("transformers")
    from builders import random_model, tiny_config
    from test_native_models import LLAMA3_SCALING, LLAMA3_THETA, _prompt, _rel, _write_llama_gguf

    config = tiny_config("llama", intermediate_size=128, rope_scaling=LLAMA3_SCALING, rope_theta=LLAMA3_THETA)
    model = random_model(config, perturbed=True)
    if kind == "gguf":
        path = tmp_path / "tiny-llama.gguf"
        _write_llama_gguf(model, config, path)  # rounds the model's weights as the file stores them
    else:
        path = tmp_path / "tiny-llama"
        model.save_pretrained(path)
    prompt = _prompt(3)
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0]
    monkeypatch.setattr(tensor_source, "SLICE_BYTES", 1)
    engine = LLMEngine(path, EngineOptions(device="cpu", load_tokenizer=False, block_size=4, threads=2, weights="float32"))
    assert _rel(engine.prompt_logits(prompt), ref) < 1e-4


def test_bfloat16_weights_are_the_float32_ones_rounded(tmp_path):
    """--weights bfloat16 computes in bfloat16 with each weight the float32 one rounded, nothing else changed."""
    pytest.importorskip("transformers")
    from builders import save_tiny, tiny_config

    path = save_tiny(tiny_config("gemma3"), tmp_path / "tiny-gemma")
    options = dict(device="cpu", load_tokenizer=False, block_size=4, threads=2)
    f32 = LLMEngine(path, EngineOptions(**options, weights="float32"))
    bf16 = LLMEngine(path, EngineOptions(**options, weights="bfloat16"))
    assert (f32.runner.dtype, bf16.runner.dtype) == (torch.float32, torch.bfloat16)
    a, b = f32.runner.model, bf16.runner.model
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        expected = p if "norm" in name else p.to(torch.bfloat16)  # norms stay float32
        assert q.dtype == expected.dtype and torch.equal(q, expected), name


def test_weight_format_choices():
    assert resolve_weights("int4", "cpu", None) == "int4"
    assert resolve_weights("auto", "cuda", "Q4_K") == "int4"
    assert resolve_weights("auto", "cuda", "Q4_0") == "int4"
    assert resolve_weights("auto", "cuda", "Q8_0") == "int8"
    assert resolve_weights("auto", "cuda", "Q6_K") == "bfloat16"  # no kernel keeps 6-bit blocks
    assert resolve_weights("auto", "cuda", None) == "bfloat16"
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_weights("auto", "cpu", "Q4_K") == ("bfloat16" if fast_bf16 else "float32")
    with pytest.raises(BadRequest, match="weights must be one of"):
        resolve_weights("int3", "cpu", None)


def test_auto_on_cuda_keeps_the_files_own_bits_only_where_they_dominate(starter_gguf):
    """The starter's layers are mostly Q5_0 (no kernel keeps 5-bit blocks): CUDA would run it in bfloat16."""
    source = load_weights(starter_gguf).tensors
    assert dominant_linear_type(source) == "Q5_0"
    assert resolve_precision("auto", None, "cuda", source) == ("bfloat16", torch.bfloat16)
    assert resolve_precision("auto", torch.float16, "cuda", source) == ("float16", torch.float16)
    assert resolve_precision("int4", None, "cuda", source) == ("int4", torch.bfloat16)
    source.close()


def test_a_dtype_that_contradicts_the_weights_is_refused(starter_gguf):
    with pytest.raises(BadRequest, match="compute in float32, not bfloat16"):
        LLMEngine(starter_gguf, EngineOptions(device="cpu", load_tokenizer=False, weights="float32", dtype="bfloat16"))
    with pytest.raises(BadRequest, match="weights must be one of"):
        LLMEngine(starter_gguf, EngineOptions(device="cpu", load_tokenizer=False, weights="q4"))


# -- quantized Hugging Face folders and the command line ------------------------------------


@pytest.fixture
def awq_folder(tmp_path) -> Path:
    from builders import tiny_llama_with_tokenizer

    folder = tiny_llama_with_tokenizer(tmp_path / "awq-llama", "the quick brown fox jumps over the lazy dog " * 5)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_quantized_hf_folder_is_refused_naming_its_method(awq_folder):
    pytest.importorskip("transformers")
    with pytest.raises(BadModelFile, match="quantized with awq, which the native engine does not read"):
        LLMEngine(awq_folder, EngineOptions(device="cpu"))
    config = json.loads((awq_folder / "config.json").read_text())
    del config["quantization_config"]
    (awq_folder / "config.json").write_text(json.dumps(config))
    (awq_folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    with pytest.raises(BadModelFile, match="quantized with gptq"):
        LLMEngine(awq_folder, EngineOptions(device="cpu"))


def _localllm(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALLLM_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "localllm", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_cli_refuses_a_quantized_folder_in_one_line(awq_folder, tmp_path):
    pytest.importorskip("transformers")
    line = _one_line_error(_localllm(tmp_path, "run", str(awq_folder), "hello", "--raw", "--max-tokens", "2"))
    assert "awq" in line


def test_cli_weights_with_llama_cpp_is_one_line(starter_gguf, tmp_path):
    line = _one_line_error(_localllm(tmp_path, "run", str(starter_gguf), "hi", "--raw", "--backend", "llamacpp",
                                     "--weights", "int4"))
    assert "--weights int4 is for the native engine" in line


def test_weights_pick_the_native_engine_and_reach_its_runner(starter_gguf):
    """--weights alone opens the native engine (llama.cpp would run the file's own blocks) with that format."""
    from localllm.backends.native import NativeBackend
    from localllm.backends.select import LoadOptions, open_backend
    from localllm.store.store import ResolvedModel

    backend = open_backend(ResolvedModel("starter", starter_gguf), LoadOptions(weights="bfloat16", n_ctx=256, n_threads=1))
    try:
        assert isinstance(backend, NativeBackend)
        runner = backend._engine.runner
        assert (runner.weights, runner.dtype) == ("bfloat16", torch.bfloat16)
    finally:
        backend.close()
