"""The native engine's models against transformers, on tiny random-weight checkpoints.

Each architecture is built with transformers from a small config, saved as a
Hugging Face folder, and loaded by the native engine from that folder. The
prompt's logits (through the paged cache, whole and in chunks) must be within
1e-4 relative of transformers' float32 forward, and 32 greedy tokens must be
the same as transformers' `generate`. A tiny Llama is also written as a GGUF
file (F32, F16 and Q8_0 tensors, llama.cpp's Q/K row order, llama3 rope as a
rope_freqs tensor) to check the GGUF path of the loader.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

from pathlib import Path

import numpy as np
import pytest
import torch

from localllm.core.requests import SamplingParams
from native.engine import EngineOptions, LLMEngine
from builders import TINY_VOCAB, permute_for_llama_cpp, random_model, save_tiny, tiny_config

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 40
LLAMA3_THETA = 500000.0
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _configs():
    return {
        "llama": tiny_config("llama", rope_scaling=LLAMA3_SCALING, rope_theta=LLAMA3_THETA),
        # a window much shorter than the prompt, so the mask and block selection matter
        "mistral": tiny_config("mistral", sliding_window=8),
        # q/k/v biases, tied embeddings, and a window on the layers from 1 on
        "qwen2": tiny_config("qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=6, max_window_layers=1),
        # q/k norms, and a head_dim that is not hidden / heads
        "qwen3": tiny_config("qwen3"),
        "gemma3": tiny_config("gemma3", final_logit_softcapping=30.0),
    }


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny(config, root / name, perturbed=True) for name, config in _configs().items()}


def _prompt(seed: int = 0) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path: Path) -> LLMEngine:
    return LLMEngine(path, EngineOptions(device="cpu", load_tokenizer=False, block_size=4, max_num_seqs=4, threads=2, weights="float32"))


def _reference(folder: Path, prompt: list[int]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    return logits, out[0, len(prompt) :].tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst relative error over positions."""
    return max(float((a[i] - b[i]).norm() / b[i].norm()) for i in range(b.shape[0]))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_prompt_logits_and_greedy_tokens_match_transformers(tiny_models, arch):
    prompt = _prompt()
    ref_logits, ref_tokens = _reference(tiny_models[arch], prompt)
    engine = _engine(tiny_models[arch])
    assert _rel(engine.prompt_logits(prompt), ref_logits) < 1e-4
    tokens = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32))[0]
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_chunked_prefill_equals_whole_prompt(tiny_models, arch):
    """Chunks of 7 tokens cross block and window edges; the logits must not change."""
    prompt = _prompt(1)
    engine = LLMEngine(
        tiny_models[arch],
        EngineOptions(device="cpu", load_tokenizer=False, block_size=4, threads=2, prefix_caching=False, weights="float32"),
    )
    whole = engine.prompt_logits(prompt)
    chunked = engine.prompt_logits(prompt, chunk=7)
    assert _rel(chunked, whole) < 1e-5


def test_hf_folder_config_is_read_as_transformers_reads_it(tiny_models):
    from localllm.core.model_config import from_hf, read_hf_config

    gemma = from_hf(read_hf_config(tiny_models["gemma3"]))
    assert gemma.sliding_layers == [True, False, True] and gemma.sliding_window == 8
    assert gemma.rope.theta == 1_000_000.0 and gemma.rope_local.theta == 10_000.0
    assert gemma.attn_scale == pytest.approx(24**-0.5) and gemma.embed_scale == pytest.approx(8.0)
    assert gemma.tie_embeddings and gemma.qk_norm and gemma.activation == "gelu_tanh"
    qwen2 = from_hf(read_hf_config(tiny_models["qwen2"]))
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_layers == [False, True, True]
    llama = from_hf(read_hf_config(tiny_models["llama"]))
    assert llama.rope.scaling == "llama3" and llama.sliding_window is None


# -- a Llama written as GGUF --------------------------------------------------------------


def _write_llama_gguf(model, config, path: Path) -> None:
    """Write `model` as llama.cpp would, and round its Q8_0 tensors in `model` the same way."""
    import gguf
    from gguf.quants import dequantize, quantize

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(LLAMA3_THETA)
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (LLAMA3_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaled = model.model.rotary_emb.inv_freq
    writer.add_tensor("rope_freqs.weight", (plain / scaled).numpy().astype(np.float32))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    with torch.no_grad():
        for name, param in model.named_parameters():
            w = param.detach().numpy().astype(np.float32)
            if name == "model.embed_tokens.weight":
                gname = "token_embd.weight"
            elif name == "model.norm.weight":
                gname = "output_norm.weight"
            elif name == "lm_head.weight":
                gname = "output.weight"
            else:
                _, _, layer, rest = name.split(".", 3)
                module = rest.rsplit(".", 1)[0]
                gname = f"blk.{layer}.{names[module]}.weight"
            if gname.endswith("attn_q.weight"):
                w = permute_for_llama_cpp(w, config.num_attention_heads)
            elif gname.endswith("attn_k.weight"):
                w = permute_for_llama_cpp(w, config.num_key_value_heads)
            if gname.endswith(("ffn_gate.weight", "ffn_up.weight", "output.weight")):
                q = quantize(w, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)))
            elif gname.endswith("attn_v.weight"):
                half = w.astype(np.float16)
                writer.add_tensor(gname, half)
                param.copy_(torch.from_numpy(half.astype(np.float32)))
            else:
                writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_gguf_loads_like_its_checkpoint(tmp_path):
    config = tiny_config("llama", intermediate_size=128, rope_scaling=LLAMA3_SCALING, rope_theta=LLAMA3_THETA)
    model = random_model(config, perturbed=True)
    path = tmp_path / "tiny-llama.gguf"
    _write_llama_gguf(model, config, path)  # also rounds the model's weights as the file stores them
    prompt = _prompt(2)
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0]
        ref_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    engine = _engine(path)
    assert engine.config.rope.freq_divisors is not None and not engine.config.tie_embeddings
    assert _rel(engine.prompt_logits(prompt), ref) < 1e-4
    assert engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32))[0] == ref_tokens
