"""Model definitions: one plain nn.Module per architecture family."""

from __future__ import annotations

from localllm.core.model_config import ModelConfig


def build_model(config: ModelConfig):
    """The nn.Module for `config`, with uninitialised weights (the loader fills them)."""
    if config.family == "gemma3":
        from .gemma3 import Gemma3ForCausalLM

        return Gemma3ForCausalLM(config)
    from .llama import LlamaForCausalLM

    return LlamaForCausalLM(config)
