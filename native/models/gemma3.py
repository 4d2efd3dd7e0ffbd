"""Gemma 3 (text): Llama's skeleton with Gemma's habits.

Differences from Llama, each checked against transformers' modeling_gemma3:
- four RMSNorms per layer: before and after attention, before and after the MLP;
- norm weights w are applied as 1 + w;
- RMSNorm on each query and key head before rotary;
- embeddings multiplied by sqrt(hidden_size);
- gelu (tanh approximation) in the MLP;
- softmax scale query_pre_attn_scalar ** -0.5;
- five sliding-window layers (local rope base 10,000) to each global layer
  (the file's rope base); the output head is the tied embedding.
All of those but the layer wiring are config switches (see config.py).
"""

from __future__ import annotations

import torch
from torch import nn

from localllm.core.model_config import ModelConfig
from ..layers.attention import AttentionBatch
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from .llama import CausalLM, SelfAttention


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = SelfAttention(config, layer)
        self.mlp = GatedMLP(dim, config.intermediate_size, config.activation, config.mlp_bias)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor, rope: dict, batch: AttentionBatch,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaDecoderLayer.forward (h is input_layernorm(x); returns the stream and next_norm of it).

        Gemma normalises each block's output before adding it: that norm runs
        in the same kernel as the add and the norm after it (`delta_norm`).
        """
        attn = self.self_attn(h, rope, batch)
        x, h = self.pre_feedforward_layernorm.add_and_norm(x, attn, delta_norm=self.post_attention_layernorm)
        return next_norm.add_and_norm(x, self.mlp(h), delta_norm=self.post_feedforward_layernorm)


class Gemma3ForCausalLM(CausalLM):
    norm_offset = 1.0
    layer_norm_names = (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, [Gemma3DecoderLayer(config, i) for i in range(config.n_layers)])
