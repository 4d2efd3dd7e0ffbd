"""Mixtures of experts: the native engine refuses them in one line; the fit planner plans them for llama.cpp only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localllm.core.errors import BadModelFile, BadRequest
from localllm.core.hardware import GPU, Hardware, LlamaCppSupport
from localllm.core.model_config import from_hf
from localllm.core.modelinfo import read_model_info
from localllm.core.units import GIB
from localllm.fit import Wishes, plan_fit

VOCAB, HIDDEN, FFN, EXPERTS = 32, 16, 32, 4


def write_moe_gguf(path: Path, arch: str, experts: int = EXPERTS) -> Path:
    """A one-layer GGUF shaped like a mixture of experts: `{arch}.expert_count` and stacked expert tensors."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    f32 = np.float32
    writer.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(f32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, f32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(HIDDEN, f32))
    for name, rows in (("attn_q", HIDDEN), ("attn_k", HIDDEN // 2), ("attn_v", HIDDEN // 2), ("attn_output", HIDDEN)):
        writer.add_tensor(f"blk.0.{name}.weight", rng.standard_normal((rows, HIDDEN)).astype(f32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(HIDDEN, f32))
    writer.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((experts, HIDDEN)).astype(f32))
    for name, shape in (("ffn_gate_exps", (experts, FFN, HIDDEN)), ("ffn_up_exps", (experts, FFN, HIDDEN)),
                        ("ffn_down_exps", (experts, HIDDEN, FFN))):
        writer.add_tensor(f"blk.0.{name}.weight", rng.standard_normal(shape).astype(f32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gpu_machine() -> Hardware:
    """A machine where the native engine would otherwise be a candidate: a 24 GiB CUDA card."""
    return Hardware(
        os="Linux", os_release="6.1", machine="x86_64", python="3.11", cpu_model="test CPU",
        physical_cores=8, logical_cores=16, cpu_flags=["avx2"],
        ram_total_bytes=64 * GIB, ram_available_bytes=64 * GIB,
        llama_cpp=LlamaCppSupport(installed=True, version="0.3.36", gpu_offload=True, cuda=True),
        torch_version="2.13.0", torch_cuda_available=True,
        gpus=[GPU(index=0, name="test GPU", vram_total_bytes=24 * GIB, vram_free_bytes=24 * GIB,
                  compute_capability="8.9", driver="550", source="torch")],
    )


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen3"])  # qwen3: an architecture the native engine runs when dense
def test_the_native_engine_refuses_a_gguf_mixture_of_experts_in_one_line(tmp_path, arch):
    from native.loader import load_config

    path = write_moe_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(BadModelFile) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{arch}' is a mixture of experts ({EXPERTS} experts)" in message
    assert message.endswith("use --backend llamacpp")


@pytest.mark.parametrize("key, model_type", [("num_experts", "qwen3_moe"), ("num_local_experts", "gpt_oss")])
def test_the_native_engine_refuses_an_hf_mixture_of_experts(key, model_type):
    cfg = {"model_type": model_type, key: 32, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(BadModelFile, match=f"'{model_type}' is a mixture of experts \\(32 experts\\).*--backend llamacpp"):
        from_hf(cfg)


def test_a_dense_hf_config_is_not_taken_for_a_mixture():
    cfg = {"model_type": "qwen3", "num_experts": 0, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 32, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 256, "rope_theta": 10000.0}
    assert from_hf(cfg).n_layers == 2


def test_the_planner_plans_a_mixture_of_experts_for_llama_cpp_only(tmp_path):
    info = read_model_info(write_moe_gguf(tmp_path / "moe.gguf", "qwen3"))
    assert info.expert_count == EXPERTS and info.is_moe
    plan = plan_fit(info, gpu_machine())
    assert plan.fits and plan.backend == "llamacpp"
    assert {c.backend for c in plan.candidates} == {"llamacpp"}  # a dense qwen3 here would list native ones
    assert any("mixture of experts" in r for r in plan.reasons)
    with pytest.raises(BadRequest, match=r"does not run a mixture of experts \(4 experts\); use --backend llamacpp"):
        plan_fit(info, gpu_machine(), Wishes(backend="native"))


def test_a_dense_gguf_keeps_its_native_candidates(starter_gguf):
    info = read_model_info(starter_gguf)
    assert info.expert_count == 0 and not info.is_moe
    assert "native" in {c.backend for c in plan_fit(info, gpu_machine()).candidates}
