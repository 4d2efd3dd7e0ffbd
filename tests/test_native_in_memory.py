"""Engines built from weights already in memory, and the CUDA-graph batch sizes.

The GPU benchmark builds random-weight models of real shapes with transformers
and hands the same tensors to the engine (nothing can be downloaded there);
this pins that path on the CPU against transformers' own forward pass.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import pytest
import torch

from localllm.core.requests import SamplingParams
from native.cuda_graphs import capture_sizes
from native.engine import EngineOptions, LLMEngine
from native.loader import from_state_dict

transformers = pytest.importorskip("transformers")


def test_engine_from_a_state_dict_matches_transformers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    prompt = torch.randint(0, 96, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        reference = model(torch.tensor([prompt])).logits[0]
        reference_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 21:].tolist()
    weights = from_state_dict(config.to_dict(), dict(model.state_dict()))
    assert weights.source == "memory" and not weights.config.tie_embeddings and weights.config.qkv_bias
    engine = LLMEngine(weights, EngineOptions(device="cpu", load_tokenizer=False, block_size=4, max_num_seqs=2, threads=2, weights="float32"))
    logits = engine.prompt_logits(prompt)
    worst = max(float((logits[i] - reference[i]).norm() / reference[i].norm()) for i in range(len(prompt)))
    assert worst < 1e-4
    assert engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0] == reference_tokens


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [(1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]), (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64])],
)
def test_cuda_graph_batch_sizes_cover_every_batch_with_little_padding(max_batch, expected):
    sizes = capture_sizes(max_batch)
    assert sizes == expected
    for n in range(1, max_batch + 1):
        padded = next(s for s in sizes if s >= n)
        assert padded - n < 8
