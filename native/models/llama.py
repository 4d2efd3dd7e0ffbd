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
import torch.nn.functional as F
from torch import nn

from localllm.core.errors import BadModelFile

from localllm.core.model_config import ModelConfig
from ..layers.attention import AttentionBatch, attend_stored, fused_decode_kernels, paged_attention
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.linear import Embedding, Linear, PackedOutput, linear
from ..layers.rotary import Rotary, apply_rotary


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

    # -- running ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Hidden states (T, hidden) after the final norm, for T new tokens."""
        x = F.embedding(input_ids, self.embed_tokens.weight)
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
        self.packed_output = PackedOutput.pack(self.output_weight, batch_hint)
        if self.packed_output is not None and not self.config.tie_embeddings:
            self.lm_head = None
        return self.packed_output is not None

    def attention_layers(self) -> list[SelfAttention]:
        return [layer.self_attn for layer in self.layers]

    # -- loading -----------------------------------------------------------------------
    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
        """Fill every parameter from HF-named tensors (consumed from the dict as they are used)."""
        from ..loader import take

        def put(module: nn.Module, attr: str, value: torch.Tensor) -> None:
            setattr(module, attr, nn.Parameter(value, requires_grad=False))

        def get(name: str) -> torch.Tensor:
            return take(tensors, name, dtype=dtype, device=device)

        def norm(module: RMSNorm, name: str) -> None:
            w = take(tensors, name, dtype=torch.float32, device=device)
            put(module, "weight", w + self.norm_offset if self.norm_offset else w)

        put(self.embed_tokens, "weight", get("model.embed_tokens.weight"))
        if self.lm_head is not None:
            put(self.lm_head, "weight", get("lm_head.weight"))
        tensors.pop("lm_head.weight", None)  # a tied checkpoint may still carry a copy
        norm(self.norm, "model.norm.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            put(attn.qkv_proj, "weight", torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]))
            if attn.qkv_proj.bias is not None:
                put(attn.qkv_proj, "bias", torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]))
            put(attn.o_proj, "weight", get(p + "self_attn.o_proj.weight"))
            if attn.o_proj.bias is not None:
                put(attn.o_proj, "bias", get(p + "self_attn.o_proj.bias"))
            if attn.q_norm is not None:
                norm(attn.q_norm, p + "self_attn.q_norm.weight")
                norm(attn.k_norm, p + "self_attn.k_norm.weight")
            mlp = layer.mlp
            put(mlp.gate_up_proj, "weight", torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
            if mlp.gate_up_proj.bias is not None:
                put(mlp.gate_up_proj, "bias", torch.cat([get(p + "mlp.gate_proj.bias"), get(p + "mlp.up_proj.bias")]))
            put(mlp.down_proj, "weight", get(p + "mlp.down_proj.weight"))
            if mlp.down_proj.bias is not None:
                put(mlp.down_proj, "bias", get(p + "mlp.down_proj.bias"))
            for name in self.layer_norm_names:
                norm(getattr(layer, name), p + f"{name}.weight")
        for name, param in self.named_parameters():
            if param.is_meta:
                raise BadModelFile(f"the model file gave no weight for {name}")
        c = self.config
        self.rotary = {"global": Rotary(c.rope, c.head_dim, device)}
        if c.rope_local is not None:
            self.rotary["local"] = Rotary(c.rope_local, c.head_dim, device)

    layer_norm_names = ("input_layernorm", "post_attention_layernorm")


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, [LlamaDecoderLayer(config, i) for i in range(config.n_layers)])
