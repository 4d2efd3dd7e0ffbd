"""Tiny random transformers models of the native engine's families, for the kernel wiring tests."""

from __future__ import annotations

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


def tiny_model(arch: str):
    """(model, config) for llama, qwen3 or gemma3 (sliding layers with a window of 8), norm weights made distinct."""
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        config = transformers.LlamaConfig(**TINY)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**TINY, head_dim=32)
    else:
        config = transformers.Gemma3TextConfig(**TINY, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights start equal: make each distinct, so a swapped one shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return model, config
