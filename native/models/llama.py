"""Llama and its close relatives: Llama 2/3, Mistral, Qwen2/2.5, Qwen3.

They differ only in switches the config carries: Llama 3's rope scaling,
Mistral's sliding window, Qwen2's biases on q/k/v, Qwen3's RMSNorm on each
query and key head. The model runs a flat batch of new tokens from many
sequences (see layers/attention.py) and returns their hidden states; logits
are computed separately, only for the rows that need them.

Weights arrive under transformers' names (see loader.py); q/k/v and gate/up
are fused into single matrices here.
"""

from __future__ import annotations

import torch
from torch import nn

from localllm.core.errors import BadModelFile

from localllm.core.model_config import ModelConfig
from ..layers.attention import AttentionBatch, attend_stored, fused_decode_kernels, paged_attention
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.linear import Embedding, Linear, PackedOutput, linear
from ..layers.rotary import Rotary, apply_rotary
from ..placement import Placer
from ..tensor_source import TensorSource


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.n_heads * self.dim, self.n_kv * self.dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(self.dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.dim, config.rms_norm_eps) if config.qk_norm else None
        self.window = config.window(layer)
        self.rope_key = "local" if config.sliding_layers[layer] and config.rope_local else "global"
        self.scale = config.attn_scale
        self.k_cache: torch.Tensor | None = None  # bound by the model runner
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: dict, batch: AttentionBatch) -> torch.Tensor:
        """Normed hidden states (T, hidden) -> attention output (T, hidden).

        On a decode step the GPU kernels run (see layers/attention.py), one
        kernel readies q and stores k and v, and attention reads the cache;
        everywhere else the ops run one by one and paged_attention stores and attends.
        """
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(n, self.n_heads, self.dim)
        k = k.view(n, self.n_kv, self.dim)
        v = v.view(n, self.n_kv, self.dim)
        cos, sin = rope[self.rope_key]
        kernels = fused_decode_kernels(q, batch)
        if kernels is not None:  # a GPU decode step: q/k norms, rotary and the K/V store in one kernel
            q = kernels.norm_rope_store(q, k, v, cos, sin, self.k_cache, self.v_cache, batch.slots(self.window),
                                        q_norm=self.q_norm, k_norm=self.k_norm)
            o = attend_stored(q, self.k_cache, self.v_cache, batch, window=self.window, scale=self.scale)
            return self.o_proj(o)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, batch, window=self.window, scale=self.scale)
        return self.o_proj(o)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, layer)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.activation, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor, rope: dict, batch: AttentionBatch,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; h: input_layernorm(x), computed with the add that made x.

        Returns the new stream and next_norm of it (the next layer's input
        norm, or the model's final one): each residual add is done together
        with the norm that reads it, one kernel on the GPU (RMSNorm.add_and_norm).
        """
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(h, rope, batch))
        return next_norm.add_and_norm(x, self.mlp(h))


class CausalLM(nn.Module):
    """What both families share: embeddings, a stack of layers, final norm, output head."""

    norm_offset = 0.0  # added to stored norm weights at load (Gemma stores w for 1 + w)

    def __init__(self, config: ModelConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: dict[str, Rotary] = {}
        self.packed_output: PackedOutput | None = None
        self.quant_output = None  # a QuantWeight of the table when a tied table is stored quantized

    # -- running ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Hidden states (T, hidden) after the final norm, for T new tokens."""
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        rope = {key: r.cos_sin(positions, x.dtype) for key, r in self.rotary.items()}
        h = self.layers[0].input_layernorm(x)
        for i, layer in enumerate(self.layers):  # (stream, its norm) in, (stream, next norm of it) out
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, h = layer(x, h, rope, batch, next_norm)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_output is not None:
            logits = self.packed_output(hidden)
        elif self.quant_output is not None:
            logits = self.quant_output(hidden).float()
        elif self.lm_head is not None:
            logits = self.lm_head(hidden).float()  # its float weight, or its quantized kernel
        else:
            logits = linear(hidden, self.output_weight).float()
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def output_weight(self) -> torch.Tensor:
        if self.config.tie_embeddings:
            return self.embed_tokens.weight
        if self.lm_head is None:
            raise RuntimeError("the output projection is kept only in its packed form")
        return self.lm_head.weight

    def pack_output_for_cpu(self, batch_hint: int) -> bool:
        """Reorder the output projection for oneDNN (see layers/linear.py); True if it took.

        A tied projection keeps the embedding table as it is (a second copy);
        an untied one is replaced by its packed form.
        """
        if self.quant_output is not None or (self.lm_head is not None and getattr(self.lm_head, "weight", None) is None):
            return False  # quantized: oneDNN's packing is for float32 weights only
        self.packed_output = PackedOutput.pack(self.output_weight, batch_hint)
        if self.packed_output is not None and not self.config.tie_embeddings:
            self.lm_head = None
        return self.packed_output is not None

    def attention_layers(self) -> list[SelfAttention]:
        return [layer.self_attn for layer in self.layers]

    # -- loading -----------------------------------------------------------------------
    def load_weights(self, source: TensorSource, dtype: torch.dtype, device: torch.device,
                     weights: str | None = None, *, dequantized: bool = False) -> None:
        """Fill every parameter from the source's HF-named tensors, each allocated once where it lives.

        `weights` is the storage format of the linear weights (see loader.WEIGHT_FORMATS; not "auto"):
        None or a float format keeps them as `dtype` parameters; int8/int4/fp8 packs them as
        QuantWeights (the output projection too: a tied table becomes a QuantEmbedding for the
        input and a QuantWeight for the output). Norms stay float32. `dequantized` stores those very
        quantized values as `dtype` parameters instead: the float reference of a quantized model.
        """
        place = Placer(source, dtype, device, weights, dequantized=dequantized)
        c = self.config
        if place.dequantized and c.tie_embeddings:
            place.dequantized_parameter(self.embed_tokens, "weight", place.quant_values(["model.embed_tokens.weight"]))
        elif place.quantized and c.tie_embeddings:
            from ..quant import QuantEmbedding, QuantWeight

            table = place.quant_values(["model.embed_tokens.weight"])
            self.embed_tokens.set_quantized(QuantEmbedding.from_values(table, place.device), dtype)
            self.quant_output = QuantWeight.pack(table, place.device)
            del table
        else:
            place.parameter(self.embed_tokens, "weight", ["model.embed_tokens.weight"])
        if self.lm_head is not None:
            place.linear(self.lm_head, ["lm_head"])
        place.norm(self.norm, "model.norm.weight", self.norm_offset)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            place.linear(attn.qkv_proj, [p + f"self_attn.{x}_proj" for x in "qkv"])
            place.linear(attn.o_proj, [p + "self_attn.o_proj"])
            if attn.q_norm is not None:
                place.norm(attn.q_norm, p + "self_attn.q_norm.weight", self.norm_offset)
                place.norm(attn.k_norm, p + "self_attn.k_norm.weight", self.norm_offset)
            place.linear(layer.mlp.gate_up_proj, [p + "mlp.gate_proj", p + "mlp.up_proj"])
            place.linear(layer.mlp.down_proj, [p + "mlp.down_proj"])
            for name in self.layer_norm_names:
                place.norm(getattr(layer, name), p + f"{name}.weight", self.norm_offset)
        for name, param in self.named_parameters():
            if param.is_meta:
                raise BadModelFile(f"the model file gave no weight for {name}")
        self.rotary = {"global": Rotary(c.rope, c.head_dim, device)}
        if c.rope_local is not None:
            self.rotary["local"] = Rotary(c.rope_local, c.head_dim, device)

    layer_norm_names = ("input_layernorm", "post_attention_layernorm")


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, [LlamaDecoderLayer(config, i) for i in range(config.n_layers)])
