"""The fit planner's formulas and policy on synthetic 1B, 8B and 70B models, against hand-computed numbers.

The shapes are Llama 3.2 1B, Llama 3.1 8B and Llama 3.1 70B (GQA: 8 KV heads)
with round per-layer weight sizes, so every expected number below can be
checked with pencil and paper from the formulas in localllm/fit/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from localllm.core.errors import BadRequest
from localllm.fit import HardwareWishes, JSON_KEYS, Wishes, hypothetical, plan_fit, predict_native_vram
from localllm.fit.llamacpp_memory import (
    CELL_BYTES,
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    CUDA_HOST_BYTES,
    VOCAB_BYTES_PER_TOKEN,
    kv_layer_bytes,
    llamacpp_memory,
)
from localllm.fit.machine import RECENT_COMPUTE_CAPABILITY
from localllm.core.kv_sizing import KVGroup, demand, window_blocks
from localllm.fit.native_memory import (
    TORCH_CPU_RUNTIME_BYTES, NativeShape, kv_pool_blocks, native_memory, weight_bytes,
)
from localllm.fit.settings import FitSettings
from localllm.core.units import GIB, MIB, parse_size
from localllm.core.weight_formats import LOAD_WORKING_BYTES
from localllm.core.hardware import GPU, Hardware, LlamaCppSupport
from localllm.core.modelinfo import ModelInfo

VOCAB = 128_256


def model(
    n_layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ffn: int,
    layer_mib: int,
    embd_mib: int,
    output_mib: int,
    parameters: int,
    *,
    window: int | None = None,
    sliding: list[int] | None = None,
    arch: str = "llama",
) -> ModelInfo:
    return ModelInfo(
        path=Path("synthetic.gguf"), format="gguf", architecture=arch, model_name="synthetic",
        parameters=parameters, quantization="Q4_K_M",
        size_bytes=(n_layers * layer_mib + embd_mib + output_mib) * MIB,
        context_length=131_072, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
        hidden_size=hidden, vocab_size=VOCAB, sliding_window=window, sliding_window_layers=sliding or [],
        rope_freq_base=500_000.0, chat_template=None, bos_token_id=1, eos_token_id=2, bos_token="<s>",
        eos_token="</s>", add_bos_token=True,
        layer_weight_bytes=[layer_mib * MIB] * n_layers, token_embd_bytes=embd_mib * MIB,
        output_bytes=output_mib * MIB, other_bytes=0, intermediate_size=ffn, layer_repack_bytes=[],
    )


ONE_B = model(16, 2048, 32, 8, 64, 8192, layer_mib=40, embd_mib=200, output_mib=0, parameters=1_240_000_000)
EIGHT_B = model(32, 4096, 32, 8, 128, 14336, layer_mib=120, embd_mib=400, output_mib=400, parameters=8_030_000_000)
SEVENTY_B = model(80, 8192, 64, 8, 128, 28672, layer_mib=480, embd_mib=800, output_mib=800, parameters=70_600_000_000)


def machine(ram_gib: float = 32, vram_gib: float | None = None, cc: str = "8.9", gpus: int = 1, cuda: bool = True) -> Hardware:
    hw = Hardware(
        os="Linux", os_release="6.1", machine="x86_64", python="3.11", cpu_model="test CPU",
        physical_cores=8, logical_cores=16, cpu_flags=["avx2"],
        ram_total_bytes=int(ram_gib * GIB), ram_available_bytes=int(ram_gib * GIB),
        llama_cpp=LlamaCppSupport(installed=True, version="0.3.36", gpu_offload=cuda, cuda=cuda),
        torch_version="2.13.0", torch_cuda_available=cuda and vram_gib is not None,
    )
    if vram_gib is not None:
        size = int(vram_gib * GIB)
        hw.gpus = [GPU(i, "test GPU", size, size, cc, None, "test") for i in range(gpus)]
    return hw


# -- KV cache -------------------------------------------------------------------------


def test_kv_per_layer_is_context_x_kv_heads_x_k_and_v_dims_x_f16():
    # 8 KV heads x 128 dims x (K + V) x 2 bytes = 4096 bytes per token and layer
    assert kv_layer_bytes(EIGHT_B, 8192, 1) == [8192 * 4096] * 32
    assert sum(kv_layer_bytes(EIGHT_B, 8192, 1)) == 1 * GIB
    assert sum(kv_layer_bytes(ONE_B, 8192, 1)) == 16 * 8192 * (8 * 64 * 2 * 2) == 256 * MIB
    assert sum(kv_layer_bytes(SEVENTY_B, 8192, 1)) == 80 * 8192 * 4096 == int(2.5 * GIB)


def test_gqa_shrinks_the_cache_by_heads_over_kv_heads():
    mha = model(32, 4096, 32, 32, 128, 14336, 120, 400, 400, 8_030_000_000)
    assert sum(kv_layer_bytes(mha, 8192, 1)) == 4 * sum(kv_layer_bytes(EIGHT_B, 8192, 1))  # 32 / 8 heads


def test_parallel_sequences_each_get_the_whole_context_padded_to_256_cells():
    mem = llamacpp_memory(EIGHT_B, context=1000, parallel=3)
    assert mem.n_ctx == 3072  # 3000 cells padded up to a multiple of 256
    assert mem.kv_bytes == 32 * 3072 * 4096


def test_llamacpp_keeps_sliding_layers_at_the_full_context():
    # Gemma-3-like: window 512, layers 0-4 slide, 5 is global (x 3)
    sliding = [i for i in range(18) if i % 6 != 5]
    gemma = model(18, 640, 4, 1, 256, 2048, 10, 170, 0, 268_000_000, window=512, sliding=sliding, arch="gemma3")
    per_token_layer = 1 * 256 * 2 * 2
    assert llamacpp_memory(gemma, context=8192).kv_bytes == 18 * 8192 * per_token_layer  # every layer, full
    # the window-sized cache would keep window + n_ubatch = 1024 cells on sliding layers
    small = kv_layer_bytes(gemma, 8192, 1, swa_full=False)
    assert sum(small) == (3 * 8192 + 15 * 1024) * per_token_layer


# -- llama.cpp by device ----------------------------------------------------------------


def test_eight_b_on_the_cpu_hand_computed():
    mem = llamacpp_memory(EIGHT_B, context=8192)
    ffn_activations = 512 * 4 * (2 * 4096 + 3 * 14336)  # residual, norm, gate, up, product: 100 MiB
    mask = 8192 * 512 * 2  # one kind of layer, f16
    assert mem.ram == {
        "weights": (32 * 120 + 400 + 400) * MIB,
        "repacked weights": 0,
        "KV cache": 1 * GIB,
        "KV bookkeeping": CELL_BYTES * 8192,  # one kind of layer: one cache
        "vocabulary": VOCAB_BYTES_PER_TOKEN * VOCAB,
        "output buffer": 4 * VOCAB * 4,  # a logits row for each of the backend's 4 slots
        "compute buffer": ffn_activations + mask + 4 * VOCAB * 4 + CPU_RUNTIME_BYTES,
    }
    assert ffn_activations == 100 * MIB
    assert mem.vram == {}


def test_eight_b_all_on_one_gpu_hand_computed():
    mem = llamacpp_memory(EIGHT_B, context=8192, n_gpu_layers=33, n_gpus=1)
    logits = 512 * 4 * (VOCAB + 2 * 4096)  # the worst case: logits of a 512-token micro-batch, 266.5 MiB
    assert logits == int(266.5 * MIB)
    assert mem.vram == {
        "weights": (32 * 120 + 400) * MIB,  # every layer and the output layer
        "KV cache": 1 * GIB,
        "compute buffer": logits + 8192 * 512 * 2,
        "CUDA context": CUDA_CONTEXT_BYTES,
    }
    assert mem.ram["weights"] == 400 * MIB  # the token embeddings never leave RAM
    assert mem.ram["KV cache"] == 0
    assert mem.ram["CUDA libraries"] == CUDA_HOST_BYTES


def test_one_b_tied_output_puts_a_copy_of_the_embeddings_on_the_gpu():
    mem = llamacpp_memory(ONE_B, context=4096, n_gpu_layers=1, n_gpus=1)  # only the output layer
    assert mem.vram["weights"] == 200 * MIB  # the tied output is the embedding table, copied
    assert mem.ram["weights"] == (16 * 40 + 200) * MIB


def test_seventy_b_partial_offload_counts_layers_from_the_top():
    mem = llamacpp_memory(SEVENTY_B, context=4096, n_gpu_layers=41, n_gpus=1)  # output + the top 40 layers
    assert mem.vram["weights"] == (40 * 480 + 800) * MIB
    assert mem.vram["KV cache"] == 40 * 4096 * 4096
    assert mem.ram["weights"] == (40 * 480 + 800) * MIB  # the bottom 40 layers and the embeddings
    assert mem.ram["KV cache"] == 40 * 4096 * 4096


# -- policy ---------------------------------------------------------------------------


def test_a_12_gib_card_runs_the_8b_entirely_on_llama_cpp():
    plan = plan_fit(EIGHT_B, machine(vram_gib=12))
    assert (plan.fits, plan.backend, plan.n_gpu_layers, plan.context_length) == (True, "llamacpp", 33, 8192)
    assert plan.vram_bytes == (32 * 120 + 400 + 1024 + 266.5 + 8 + 512) * MIB  # weights, KV, compute, CUDA context
    assert any("native engine" in r and "bar" in r for r in plan.reasons)  # 12 GiB is below its 16 GiB bar


def test_a_24_gib_ampere_card_plans_the_native_engine_in_bf16_with_only_a_working_buffer_of_ram():
    plan = plan_fit(EIGHT_B, machine(ram_gib=64, vram_gib=24, cc="8.6"), Wishes(backend="native", weights="bfloat16"))
    assert (plan.fits, plan.backend, plan.device, plan.weights) == (True, "native", "cuda:0", "bfloat16")
    assert plan.vram_parts["weights"] == weight_bytes(EIGHT_B, "bfloat16")
    assert "bfloat16" in plan.reasons[0]
    # the loader streams slices to the GPU: torch, the CUDA libraries and its working buffer, never the weights
    assert plan.ram_bytes == LOAD_WORKING_BYTES + TORCH_CPU_RUNTIME_BYTES + CUDA_HOST_BYTES


def test_where_no_native_format_fits_the_reason_says_why_not_native():
    plan = plan_fit(SEVENTY_B, machine(ram_gib=128, vram_gib=24, cc="8.6", gpus=2))
    assert plan.backend == "llamacpp" and plan.n_gpu_layers == 81
    assert "rather than the native engine" in plan.reasons[1] and "does not fit" in plan.reasons[1]
    natives = [c for c in plan.candidates if c.backend == "native"]
    assert natives and not any(c.fits for c in natives)  # 70B even in int4 is more than one 24 GiB card


def test_below_compute_capability_8_it_is_llama_cpp_even_with_room():
    plan = plan_fit(EIGHT_B, machine(vram_gib=24, cc="7.5"))
    assert plan.backend == "llamacpp" and plan.n_gpu_layers == 33


def test_an_8_gib_card_takes_as_many_70b_layers_as_fit_and_ram_the_rest():
    hw = machine(ram_gib=64, vram_gib=8)
    plan = plan_fit(SEVENTY_B, hw, Wishes(context=4096))
    usable = 7 * GIB  # 8 GiB less the 1 GiB margin
    compute = 512 * 4 * (VOCAB + 2 * 8192) + 4096 * 512 * 2
    per_layer = 480 * MIB + 4096 * 4096  # weights and KV of one layer at 4096 tokens
    fixed = 800 * MIB + compute + CUDA_CONTEXT_BYTES  # output layer, compute buffer, CUDA context
    assert plan.n_gpu_layers == 1 + (usable - fixed) // per_layer == 12
    assert plan.fits and plan.device == "cpu+gpu"
    assert not any("fully on the GPU" in a or "entirely on the GPU" in a for a in plan.alternatives)  # nothing puts a 70B on 8 GiB


def test_two_24_gib_cards_hold_a_70b():
    plan = plan_fit(SEVENTY_B, machine(vram_gib=24, gpus=2, ram_gib=64))
    assert plan.backend == "llamacpp" and plan.n_gpu_layers == 81 and plan.fits


def test_context_is_the_largest_multiple_of_256_that_fits():
    # 1B on a CPU with little RAM: weights + fixed parts, then 16 x 2048 bytes of KV per token
    hw = machine(ram_gib=1.2, vram_gib=None)
    plan = plan_fit(ONE_B, hw)
    assert plan.fits and plan.context_length % 256 == 0 and plan.context_length < 8192
    bigger = llamacpp_memory(ONE_B, context=plan.context_length + 256)
    assert bigger.ram_bytes > plan.ram_usable >= plan.ram_bytes
    assert plan.ram_usable == int(1.2 * GIB) - int(0.1 * 1.2 * GIB)


def test_nothing_fits_says_so_with_the_ram_it_needs():
    plan = plan_fit(SEVENTY_B, machine(ram_gib=16, vram_gib=None))
    assert not plan.fits
    assert plan.reasons[-1].startswith("does not fit: needs")
    assert plan.context_length == 256  # the smallest automatic context was tried last


def test_an_asked_context_above_the_trained_one_is_a_bad_request():
    with pytest.raises(BadRequest, match="trained"):
        plan_fit(EIGHT_B, machine(), Wishes(context=200_000))


def test_safetensors_models_go_to_the_native_engine_and_not_to_llama_cpp():
    hf = model(16, 2048, 32, 8, 64, 8192, 40, 200, 0, 1_240_000_000)
    hf.format = "safetensors"
    plan = plan_fit(hf, machine(vram_gib=None))
    assert plan.backend == "native" and plan.device == "cpu"
    with pytest.raises(BadRequest, match="GGUF"):
        plan_fit(hf, machine(), Wishes(backend="llamacpp"))


def test_plan_json_has_exactly_the_issue_keys():
    assert list(plan_fit(ONE_B, machine()).to_dict()) == [
        "fits", "backend", "n_gpu_layers", "context_length", "parallel",
        "kv_bytes", "ram_bytes", "vram_bytes", "reasons", "alternatives",
        "weights", "decode_tok_s", "throughput_tok_s", "candidates",
    ]
    assert JSON_KEYS == tuple(plan_fit(ONE_B, machine()).to_dict())


# -- the native engine ------------------------------------------------------------------


def test_native_sliding_layers_keep_a_window_per_sequence_plus_one_step():
    sliding = [i for i in range(18) if i % 6 != 5]
    gemma = model(18, 640, 4, 1, 256, 2048, 10, 170, 0, 268_000_000, window=512, sliding=sliding, arch="gemma3")
    shape = NativeShape.from_info(gemma)
    # window blocks while decoding: ceil((512 + 1 - 2) / 16) + 1 = 33
    assert window_blocks(512, 16, 1) == 33
    assert kv_pool_blocks(shape, context=2048, parallel=1, step_tokens=256) == [(3, 128), (15, 33 + 1 + 256 // 16)]
    mem = native_memory(shape, device="cpu", context=2048)
    block = 2 * 16 * 1 * 256 * 4  # K and V, 16 tokens, 1 KV head of 256, float32: per layer
    assert mem.kv_bytes == (3 * 128 + 15 * 50) * block
    # a context inside the window: one pool for every layer
    assert kv_pool_blocks(shape, context=512, parallel=1, step_tokens=256) == [(18, 32)]


def test_native_windows_agree_with_the_engine():
    group = KVGroup(list(range(15)), 512)
    engine = demand(group, block_size=16, n_ctx=8192, max_num_seqs=4, max_num_batched_tokens=256)
    sliding = [i % 6 != 5 for i in range(18)]
    shape = NativeShape(262_144, 640, 2048, 18, 4, 1, 256, 512, tuple(sliding), True, 268_000_000)
    assert kv_pool_blocks(shape, context=8192, parallel=4, step_tokens=256)[1] == (15, engine)


def test_native_vram_for_an_8b_config_hand_computed():
    from localllm.core.model_config import ModelConfig, RopeSpec

    config = ModelConfig(
        architecture="llama", family="llama", vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336,
        n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position=131072,
        rope=RopeSpec(theta=500000.0),
    )
    mem = predict_native_vram(config, "cuda", 4096)
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 4 * 4096 + 2 * 128
    parameters = 32 * per_layer + 2 * VOCAB * 4096 + 4096
    assert 8.0e9 < parameters < 8.1e9  # Llama 3.1 8B
    assert mem.parts["weights"] == parameters * 2  # bf16
    assert mem.kv_bytes == 32 * 4096 * (8 * 128 * 2 * 2)  # 512 MiB: 256 blocks of 16 tokens
    assert mem.parts["KV cache"] == mem.kv_bytes + 2 * 32 * 16 * 8 * 128 * 2  # plus the scratch block
    assert mem.allocated_bytes == mem.total_bytes - mem.parts["CUDA context"]
    on_cpu = predict_native_vram(config, "cpu", 4096)
    assert on_cpu.parts["weights"] == parameters * 4 and "CUDA context" not in on_cpu.parts


# -- hypothetical hardware --------------------------------------------------------------


def test_vram_without_compute_capability_is_a_recent_nvidia_card():
    hw = hypothetical(machine(vram_gib=None, cuda=False), HardwareWishes(vram=12 * GIB))
    assert [(g.vram_total_bytes, g.vram_free_bytes, g.compute_capability) for g in hw.gpus] == [
        (12 * GIB, 12 * GIB, RECENT_COMPUTE_CAPABILITY)
    ]
    assert RECENT_COMPUTE_CAPABILITY == "8.9"
    assert hw.llama_cpp.cuda and hw.torch_cuda_available  # the question is about the card, not this install


def test_vram_zero_means_no_gpu():
    hw = hypothetical(machine(vram_gib=24), HardwareWishes(vram=0))
    assert hw.gpus == []
    plan = plan_fit(EIGHT_B, hw)
    assert plan.device == "cpu" and plan.vram_bytes == 0


def test_gpus_and_compute_capability_and_ram():
    hw = hypothetical(machine(ram_gib=64), HardwareWishes(vram=16 * GIB, gpus=4, compute_capability="7.0", ram=8 * GIB))
    assert len(hw.gpus) == 4 and {g.compute_capability for g in hw.gpus} == {"7.0"}
    assert hw.ram_total_bytes == hw.ram_available_bytes == 8 * GIB
    replaced = hypothetical(machine(vram_gib=24, cc="8.6"), HardwareWishes(compute_capability="7.5"))
    assert replaced.gpus[0].compute_capability == "7.5" and replaced.gpus[0].vram_total_bytes == 24 * GIB


def test_bad_hypothetical_hardware_is_a_bad_request():
    with pytest.raises(BadRequest, match="8.9"):
        hypothetical(machine(), HardwareWishes(vram=GIB, compute_capability="89"))
    with pytest.raises(BadRequest, match="--vram"):
        hypothetical(machine(vram_gib=None), HardwareWishes(gpus=2))


def test_sizes_are_binary_and_bare_numbers_are_bytes():
    assert parse_size("12GiB", "--vram") == parse_size("12GB", "--vram") == parse_size("12G", "--vram") == 12 * GIB
    assert parse_size("12", "--vram") == 12 and parse_size("64KiB", "--max-body") == 64 * 1024
    assert parse_size("7.5G", "--vram") == int(7.5 * GIB)
    assert parse_size("512MiB", "--ram") == 512 * MIB
    assert parse_size("0", "--vram") == 0
    with pytest.raises(BadRequest, match="--vram"):
        parse_size("lots", "--vram")


def test_margins_come_from_settings_and_the_environment():
    settings = FitSettings.from_env({"LOCALLLM_FIT_VRAM_MARGIN": "2GiB", "LOCALLLM_FIT_RAM_MARGIN": "0.25"})
    assert settings.vram_margin_bytes == 2 * GIB and settings.ram_margin_fraction == 0.25
    plan = plan_fit(EIGHT_B, machine(ram_gib=32, vram_gib=12), settings=settings)
    assert plan.vram_usable == 10 * GIB and plan.ram_usable == 24 * GIB
    with pytest.raises(BadRequest):
        FitSettings.from_env({"LOCALLLM_FIT_RAM_MARGIN": "2"})


def test_a_manifest_cached_before_the_planners_fields_still_loads():
    cached = EIGHT_B.to_dict()
    del cached["intermediate_size"], cached["layer_repack_bytes"]
    info = ModelInfo.from_dict(cached)
    assert (info.intermediate_size, info.layer_repack_bytes) == (0, [])
    assert plan_fit(info, machine(vram_gib=12)).fits  # an unknown FFN width is taken as 4 x hidden


# -- backends follow the plan ------------------------------------------------------------


def test_open_backend_options_come_from_the_plan():
    from localllm.backends.select import LoadOptions
    from localllm.core.errors import DoesNotFit
    from localllm.fit.follow import follow_plan

    gpu = follow_plan("eight", EIGHT_B, LoadOptions(), hardware=machine(vram_gib=12))
    assert (gpu.backend, gpu.n_gpu_layers, gpu.n_ctx) == ("llamacpp", 33, 8192)
    asked = follow_plan("eight", EIGHT_B, LoadOptions(n_ctx=2048), hardware=machine(vram_gib=12))
    assert asked.n_ctx == 2048  # the user's context wins
    hf = model(16, 2048, 32, 8, 64, 8192, 40, 200, 0, 1_240_000_000)
    hf.format = "safetensors"
    native = follow_plan("hf", hf, LoadOptions(), hardware=machine(vram_gib=None))
    assert native.backend == "native" and native.kv_cache_bytes == plan_fit(hf, machine(vram_gib=None)).kv_bytes
    with pytest.raises(DoesNotFit, match=r"^--backend llamacpp cannot run 'seventy' here: does not fit: needs"):
        follow_plan("seventy", SEVENTY_B, LoadOptions(backend="llamacpp"), hardware=machine(ram_gib=16, vram_gib=None))


def test_a_draft_model_is_planned_in_what_the_model_leaves():
    from localllm.backends.select import LoadOptions
    from localllm.core.errors import DoesNotFit
    from localllm.core.speculation import SpeculationOptions
    from localllm.fit.follow import follow_plan

    draft_one = SpeculationOptions("draft", draft="one")
    one_b = model(16, 2048, 32, 8, 64, 8192, layer_mib=40, embd_mib=200, output_mib=0, parameters=1_240_000_000)
    layers = []
    for vram in (12, 8, 6):  # the model keeps its GPU layers; the draft gets what is left
        options = follow_plan("eight", EIGHT_B, LoadOptions(speculation=draft_one), hardware=machine(vram_gib=vram), draft=one_b)
        alone = follow_plan("eight", EIGHT_B, LoadOptions(), hardware=machine(vram_gib=vram))
        assert (options.n_gpu_layers, options.n_ctx) == (alone.n_gpu_layers, alone.n_ctx)
        layers.append(options.speculation.draft_n_gpu_layers)
    assert layers == [17, 3, 0]
    assert follow_plan("eight", EIGHT_B, LoadOptions(speculation=draft_one), hardware=machine(ram_gib=8), draft=one_b).n_ctx == 8192
    with pytest.raises(DoesNotFit, match=r"^the draft model 'one' does not fit beside 'eight': does not fit: needs"):
        follow_plan("eight", EIGHT_B, LoadOptions(speculation=draft_one), hardware=machine(ram_gib=7), draft=one_b)


# -- headers from the first bytes of a file -------------------------------------------------


def test_a_header_read_from_the_first_bytes_matches_the_file_and_says_when_it_needs_more(starter_gguf):
    from localllm.core.errors import BadModelFile
    from localllm.core.gguf_reader import HeaderIncomplete, read_gguf, read_gguf_bytes

    size = starter_gguf.stat().st_size
    head = starter_gguf.read_bytes()[: 8 << 20]
    whole = read_gguf(starter_gguf)
    partial = read_gguf_bytes(head, size, "remote.gguf")
    assert (partial.tensors, partial.data_offset, partial.file_size) == (whole.tensors, whole.data_offset, size)
    with pytest.raises(HeaderIncomplete):
        read_gguf_bytes(head[: 1 << 20], size, "remote.gguf")
    with pytest.raises(BadModelFile, match="bad magic"):  # corrupt, however many bytes came
        read_gguf_bytes(b"NOPE" + head[4:], size, "remote.gguf")
