"""The selector: weight bytes per native format, predicted decode speed, and the choice of the faster engine.

The synthetic 8B is tests/test_fit.py's (Llama 3.1 8B shapes, a Q4_K_M-sized
file); the GPUs are named as nvidia-smi names them, so their bandwidth comes
from the spec table. Predictions are compared with each other (which is
faster), never with hard-coded speeds: the efficiencies behind them change as
the engines are measured.
"""

from __future__ import annotations

import json

import pytest

from localllm.backends.select import LoadOptions
from localllm.core.hardware import GPU
from localllm.core.units import GIB
from localllm.fit import Wishes, plan_fit
from localllm.fit import bandwidth
from localllm.fit.candidates import auto_formats
from localllm.fit.follow import follow_plan
from localllm.fit.native_memory import weight_bytes, weight_parts
from test_fit import EIGHT_B, VOCAB, machine, model

RTX_4090 = "NVIDIA GeForce RTX 4090"
H100 = "NVIDIA H100 80GB HBM3"


def named(hw, name: str):
    hw.gpus = [GPU(g.index, name, g.vram_total_bytes, g.vram_free_bytes, g.compute_capability, None, "test") for g in hw.gpus]
    return hw


def by_key(plan):
    return {(c.backend, c.weights): c for c in plan.candidates}


def chosen_of(plan):
    return next(c for c in plan.candidates if c.plan is plan)


# -- weight bytes ----------------------------------------------------------------------------


def test_weight_bytes_of_each_format_for_an_8b_config_hand_computed():
    from localllm.core.model_config import ModelConfig, RopeSpec

    config = ModelConfig(
        architecture="llama", family="llama", vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336,
        n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position=131072,
        rope=RopeSpec(theta=500000.0),
    )
    # per layer: fused QKV (6144 x 4096), O (4096 x 4096), fused gate/up (28672 x 4096), down (4096 x 14336)
    matrices = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    linear = 32 * sum(n * k for n, k in matrices)
    rows = 32 * sum(n for n, _ in matrices)
    table = VOCAB * 4096  # untied: the embeddings and the output projection, each this many values
    norms = 32 * (4 * 4096 + 2 * 128) + 4096  # float32 whatever the format
    assert weight_bytes(config, "float32") == 4 * (linear + 2 * table + norms)
    assert weight_bytes(config, "bfloat16") == 2 * (linear + 2 * table) + 4 * norms
    # int4: half a byte a value, a bfloat16 scale and zero (4 bytes) per group of 32 values
    assert weight_bytes(config, "int4") == (linear + 2 * table) // 2 + (linear + 2 * table) // 32 * 4 + 4 * norms
    # int8: a byte a value and a bfloat16 scale per row; fp8: a byte a value and a float32 scale per row
    assert weight_bytes(config, "int8") == linear + 2 * table + 2 * (rows + 2 * VOCAB) + 4 * norms
    assert weight_bytes(config, "fp8") == linear + 2 * table + 4 * (rows + 2 * VOCAB) + 4 * norms
    assert 15.5e9 < weight_bytes(config, "bfloat16") < 16.5e9 < 32e9 < weight_bytes(config, "float32")
    assert 4.5e9 < weight_bytes(config, "int4") < 5.5e9  # about Q4_K_M's 4.9 GB
    # a token reads all of it but the embedding table, of which it gathers one row
    assert weight_parts(config, "int4").read_per_token == weight_bytes(config, "int4") - (table // 2 + table // 32 * 4)
    with pytest.raises(ValueError, match="not one of"):
        weight_bytes(config, "int3")


def test_a_tied_float_table_is_read_as_the_output_a_quantized_one_is_kept_twice():
    gemma = model(18, 640, 4, 1, 256, 2048, 10, 170, 0, 268_000_000, arch="gemma3")  # output_mib=0: tied
    float_parts, int8_parts = weight_parts(gemma, "bfloat16"), weight_parts(gemma, "int8")
    assert float_parts.embedding == 0 and float_parts.output == VOCAB * 640 * 2
    assert int8_parts.embedding == int8_parts.output == VOCAB * 640 + 2 * VOCAB  # the lookup's own copy


# -- the choice --------------------------------------------------------------------------------


def test_on_an_rtx_4090_llama_cpp_q4_k_m_beats_native_bf16_for_one_person_chatting():
    plan = plan_fit(EIGHT_B, named(machine(ram_gib=64, vram_gib=24, cc="8.9"), RTX_4090))
    candidates = by_key(plan)
    llama, bf16 = candidates["llamacpp", "Q4_K_M"], candidates["native", "bfloat16"]
    assert bf16.fits and bf16.auto  # native bf16 fits the card: before the selector it would have been the plan
    assert (plan.backend, plan.weights, plan.device) == ("llamacpp", "Q4_K_M", "gpu")
    assert llama.decode_tok_s > 2 * bf16.decode_tok_s  # a token reads ~5 GB against ~16 GB
    assert bf16.speed.read_bytes > 3 * llama.speed.read_bytes
    fitting = [c for c in plan.candidates if c.auto and c.fits]
    assert plan.decode_tok_s == max(c.decode_tok_s for c in fitting) == llama.decode_tok_s
    assert plan.reasons[1].startswith("llama.cpp Q4_K_M: ") and "tok/s predicted vs native" in plan.reasons[1]
    assert "RTX 4090, spec sheet" in plan.reasons[2]


def test_on_an_h100_many_parallel_requests_go_to_the_highest_predicted_throughput():
    hw = named(machine(ram_gib=128, vram_gib=80, cc="9.0"), H100)
    alone = plan_fit(EIGHT_B, hw, Wishes(context=2048, parallel=1))
    many = plan_fit(EIGHT_B, hw, Wishes(context=2048, parallel=64))
    for plan, metric in ((alone, "decode_tok_s"), (many, "throughput_tok_s")):
        fitting = [c for c in plan.candidates if c.auto and c.fits]
        assert len(fitting) >= 3 and getattr(plan, metric) == max(getattr(c, metric) for c in fitting)
    # what the model predicts: one stream reads fewest bytes on llama.cpp; 64 share each weight read on the native engine
    assert alone.backend == "llamacpp"
    assert many.backend == "native" and many.weights in auto_formats(EIGHT_B, hw, cuda=True)
    llama = by_key(many)["llamacpp", "Q4_K_M"]
    assert many.throughput_tok_s > llama.throughput_tok_s > llama.decode_tok_s  # batching helps both, native more
    assert "64 parallel requests" in many.reasons[1] and many.reasons[1].startswith(f"native {many.weights}: ")


def test_candidates_that_do_not_fit_say_fits_false():
    hw = named(machine(ram_gib=64, vram_gib=16, cc="8.9"), "NVIDIA GeForce RTX 4060 Ti")
    listed = plan_fit(EIGHT_B, hw).to_dict()["candidates"]
    fits = {(c["backend"], c["weights"]): c["fits"] for c in listed}
    assert fits["native", "float32"] is False and fits["native", "bfloat16"] is False  # 16 GB of bf16 on a 16 GiB card
    assert fits["native", "int4"] is True and fits["llamacpp", "Q4_K_M"] is True
    for c in listed:
        assert {"backend", "weights", "fits", "decode_tok_s", "throughput_tok_s", "parallel"} <= set(c)
        assert c["decode_tok_s"] > 0


def test_a_16_bit_checkpoint_is_never_requantized_for_the_user():
    hf = model(16, 2048, 32, 8, 64, 8192, 80, 500, 0, 1_240_000_000)  # bf16-sized: 16 bits a weight
    hf.format = "safetensors"
    plan = plan_fit(hf, named(machine(ram_gib=64, vram_gib=80, cc="9.0"), H100))
    auto = {c.weights for c in plan.candidates if c.auto}
    assert auto == {"bfloat16"} and plan.weights == "bfloat16"
    assert {"int4", "int8", "fp8"} <= {c.weights for c in plan.candidates}  # listed, for --weights
    int4 = by_key(plan)["native", "int4"]
    assert int4.fits and int4.decode_tok_s > plan.decode_tok_s  # faster, and still not chosen: the reasons say so
    assert "would be faster" in plan.reasons[1] and "requantizes" in plan.reasons[1] and "--weights int4" in plan.reasons[1]
    asked = plan_fit(hf, named(machine(ram_gib=64, vram_gib=80, cc="9.0"), H100), Wishes(weights="int4"))
    assert (asked.backend, asked.weights) == ("native", "int4")


def test_on_the_cpu_a_gguf_stays_on_llama_cpp_and_native_is_listed_not_chosen():
    plan = plan_fit(EIGHT_B, machine(ram_gib=64, vram_gib=None))
    assert plan.backend == "llamacpp" and plan.decode_tok_s > 0
    natives = [c for c in plan.candidates if c.backend == "native"]
    assert natives and not any(c.auto for c in natives) and all(c.plan.device == "cpu" for c in natives)


def test_the_plan_carries_its_weight_format_to_the_native_load():
    hw = named(machine(ram_gib=128, vram_gib=80, cc="9.0"), H100)
    options = follow_plan("8b", EIGHT_B, LoadOptions(n_ctx=2048), hardware=hw, parallel=64)
    plan = plan_fit(EIGHT_B, hw, Wishes(context=2048, parallel=64))
    assert (options.backend, options.weights) == ("native", plan.weights)
    llama = follow_plan("8b", EIGHT_B, LoadOptions(n_ctx=2048), hardware=hw)
    assert (llama.backend, llama.weights) == ("llamacpp", "auto")


def test_a_weight_format_for_llama_cpp_or_an_unknown_one_is_a_bad_request():
    from localllm.core.errors import BadRequest

    with pytest.raises(BadRequest, match="--weights int4 is for the native engine"):
        plan_fit(EIGHT_B, machine(), Wishes(backend="llamacpp", weights="int4"))
    with pytest.raises(BadRequest, match="--weights is one of"):
        plan_fit(EIGHT_B, machine(), Wishes(weights="int3"))


# -- bandwidth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"), ("NVIDIA A100-PCIE-40GB", "A100 40GB"), ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 5090", "RTX 5090"), ("NVIDIA GeForce RTX 4060 Ti", "RTX 4060 Ti"),
        ("NVIDIA GeForce RTX 4060", "RTX 4060"), ("NVIDIA GeForce RTX 4070", "RTX 4070"),
        ("NVIDIA GeForce RTX 4080 SUPER", "RTX 4080"),
    ],
)
def test_known_gpus_are_found_by_the_name_nvidia_smi_reports(name, label):
    assert bandwidth.spec_for(name)[0] == label


def test_gpu_bandwidth_from_a_measurement_else_the_spec_sheet_else_a_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path))
    monkeypatch.delenv("LOCALLLM_FIT_GPU_BANDWIDTH", raising=False)
    card = GPU(0, RTX_4090, 24 * GIB, 24 * GIB, "8.9", None, "test")
    assert bandwidth.gpu_speed(card).source == "spec sheet" and bandwidth.gpu_speed(card).bytes_per_s == 1008e9
    unknown = bandwidth.gpu_speed(GPU(0, "hypothetical GPU", GIB, GIB, "8.9", None, "test"))
    assert (unknown.source, unknown.bytes_per_s) == ("default", bandwidth.DEFAULT_GPU_BYTES_PER_S)
    bandwidth.record_gpu_bandwidth(RTX_4090, 900e9)
    assert (bandwidth.gpu_speed(card).source, bandwidth.gpu_speed(card).bytes_per_s) == ("measured", 900e9)
    assert bandwidth.gpu_speed(card, {"LOCALLLM_FIT_GPU_BANDWIDTH": "100GiB"}).bytes_per_s == 100 * GIB


def test_cpu_bandwidth_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path))
    hw = machine(vram_gib=None)
    first = bandwidth.cpu_speed(hw, threads=1, environ={})
    assert first.source == "measured" and 1e9 < first.bytes_per_s < 1e13
    cache = json.loads((tmp_path / "bandwidth.json").read_text())
    assert cache["cpu:test CPU:1"]["bytes_per_s"] == first.bytes_per_s
    assert bandwidth.cpu_speed(hw, threads=1, environ={}).bytes_per_s == first.bytes_per_s  # from the cache
    assert bandwidth.cpu_speed(hw, environ={"LOCALLLM_FIT_CPU_BANDWIDTH": "10GiB"}).bytes_per_s == 10 * GIB
