"""A model's shape in the engine's own terms, from an HF config.json or a GGUF header.

Both sources describe the same handful of facts with different names and
different gaps: GGUF files do not say which Gemma 3 layers slide or what the
local rope base is (llama.cpp hard-codes them per architecture, and so do we);
HF configs changed their rope keys between transformers 4 and 5. Everything
downstream reads only `ModelConfig`. No torch here: the app reads configs
without the engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.core.errors import BadModelFile

# HF model_type -> (our family, display architecture)
HF_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
GGUF_ARCHS: dict[str, str] = {"llama": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3": "gemma3"}

GEMMA3_GLOBAL_EVERY = 6  # layers 5, 11, 17, ... attend globally; the rest through the window
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


@dataclass
class RopeSpec:
    """How rotary frequencies are made: a base and an optional scaling rule."""

    theta: float
    scaling: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # GGUF files of Llama 3.1+ carry llama3 scaling precomputed as one divisor per frequency.
    freq_divisors: list[float] | None = None


@dataclass
class ModelConfig:
    architecture: str  # as the source names it: llama, mistral, qwen2, qwen3, gemma3
    family: str  # which module implements it: "llama" or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope: RopeSpec  # global (full-attention) layers
    rope_local: RopeSpec | None = None  # sliding layers, where they differ (Gemma 3)
    sliding_window: int | None = None
    sliding_layers: list[bool] = field(default_factory=list)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    activation: str = "silu"  # silu | gelu_tanh
    attn_scale: float = 0.0  # softmax scale; 0 means head_dim ** -0.5
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sliding_layers:
            self.sliding_layers = [self.sliding_window is not None] * self.n_layers
        if not self.attn_scale:
            self.attn_scale = self.head_dim**-0.5

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None where it attends to everything."""
        return self.sliding_window if self.sliding_layers[layer] else None


# -- Hugging Face config.json ---------------------------------------------------


def read_hf_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise BadModelFile(f"{folder} has no config.json; it is not a Hugging Face model folder")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise BadModelFile(f"{cfg_path} is not valid JSON ({exc})") from None


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BadModelFile(f"{folder} has no .safetensors weights")
    return files


def from_hf(cfg: dict[str, Any], *, has_lm_head: bool | None = None) -> ModelConfig:
    """ModelConfig from a parsed config.json (transformers 4 or 5 layout)."""
    if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}  # the text half of the multimodal model
    model_type = cfg.get("model_type")
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # Qwen MoE; Mixtral and gpt-oss
    if isinstance(experts, int) and experts > 0:
        raise BadModelFile(moe_refusal(f"model type '{model_type}'", experts))
    if model_type not in HF_TYPES:
        supported = ", ".join(sorted(HF_TYPES))
        raise BadModelFile(f"model type '{model_type}' is not supported by the native engine (supported: {supported})")
    family = HF_TYPES[model_type]
    gemma = family == "gemma3"
    n_layers = _req(cfg, "num_hidden_layers")
    hidden = _req(cfg, "hidden_size")
    n_heads = _req(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim") or hidden // n_heads
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    sliding = _hf_sliding_layers(cfg, model_type, n_layers, window)
    rope, rope_local = _hf_rope(cfg, gemma)
    tie = cfg.get("tie_word_embeddings", gemma)
    if has_lm_head is False:
        tie = True
    eos = cfg.get("eos_token_id")
    attention_bias = bool(cfg.get("attention_bias", False))
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    return ModelConfig(
        architecture="gemma3" if gemma else model_type,
        family=family,
        vocab_size=_req(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_req(cfg, "intermediate_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        rope=rope,
        rope_local=rope_local,
        sliding_window=window if any(sliding) else None,
        sliding_layers=sliding,
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=gemma or model_type == "qwen3",
        tie_embeddings=bool(tie),
        activation=_activation(activation),
        attn_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5 if gemma else 0.0,
        embed_scale=math.sqrt(hidden) if gemma else None,
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_ids(eos),
    )


def _req(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise BadModelFile(f"config.json lacks '{key}'")
    return cfg[key]


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _activation(name: str) -> str:
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return "gelu_tanh"
    raise BadModelFile(f"activation '{name}' is not supported by the native engine")


def _hf_sliding_layers(cfg: dict[str, Any], model_type: str, n_layers: int, window: int | None) -> list[bool]:
    if not window:
        return [False] * n_layers
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return [t == "sliding_attention" for t in types]
    if model_type in ("gemma3", "gemma3_text"):
        period = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or GEMMA3_GLOBAL_EVERY
        return [(i + 1) % period != 0 for i in range(n_layers)]
    if model_type in ("qwen2", "qwen3"):
        first = cfg.get("max_window_layers", n_layers)
        return [i >= first for i in range(n_layers)]
    return [True] * n_layers  # Mistral: every layer slides


def _hf_rope(cfg: dict[str, Any], gemma: bool) -> tuple[RopeSpec, RopeSpec | None]:
    params = cfg.get("rope_parameters")
    if gemma:
        if isinstance(params, dict) and "full_attention" in params:
            full = _rope_spec(params.get("full_attention") or {}, 1_000_000.0)
            local = _rope_spec(params.get("sliding_attention") or {}, GEMMA3_LOCAL_ROPE_BASE)
            return full, local
        full = _rope_spec({"rope_theta": cfg.get("rope_theta", 1_000_000.0), **(cfg.get("rope_scaling") or {})}, 1e6)
        local = RopeSpec(theta=float(cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE)))
        return full, local
    if isinstance(params, dict):
        return _rope_spec(params, 10_000.0), None
    legacy = {"rope_theta": cfg.get("rope_theta", 10_000.0), **(cfg.get("rope_scaling") or {})}
    return _rope_spec(legacy, 10_000.0), None


def _rope_spec(p: dict[str, Any], default_theta: float) -> RopeSpec:
    kind = p.get("rope_type") or p.get("type") or "default"
    theta = float(p.get("rope_theta", default_theta))
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, scaling="linear", factor=float(p["factor"]))
    if kind == "llama3":
        return RopeSpec(
            theta=theta,
            scaling="llama3",
            factor=float(p["factor"]),
            low_freq_factor=float(p["low_freq_factor"]),
            high_freq_factor=float(p["high_freq_factor"]),
            original_max_position=int(p["original_max_position_embeddings"]),
        )
    raise BadModelFile(f"rope scaling '{kind}' is not supported by the native engine")


# -- GGUF header ----------------------------------------------------------------


def moe_refusal(what: str, experts: int) -> str:
    """One line for a mixture of experts: the native engine runs dense models only; llama.cpp runs these."""
    return f"{what} is a mixture of experts ({experts} experts), which the native engine does not run; use --backend llamacpp"


def from_gguf(meta: dict[str, Any], tensor_names: set[str], vocab_size: int) -> ModelConfig:
    """ModelConfig from GGUF metadata; `tensor_names` answer what the header does not say."""
    arch = meta.get("general.architecture")
    experts = meta.get(f"{arch}.expert_count")
    if isinstance(experts, int) and experts > 0:
        raise BadModelFile(moe_refusal(f"GGUF architecture '{arch}'", experts))
    if arch not in GGUF_ARCHS:
        supported = ", ".join(sorted(GGUF_ARCHS))
        raise BadModelFile(f"GGUF architecture '{arch}' is not supported by the native engine (supported: {supported})")
    family = GGUF_ARCHS[arch]
    gemma = family == "gemma3"

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise BadModelFile(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):  # per-layer values: the engine needs one
            value = max(value)
        return value

    n_layers = int(get("block_count"))
    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    window = meta.get(f"{arch}.attention.sliding_window") or None
    if gemma:
        sliding = [(i + 1) % GEMMA3_GLOBAL_EVERY != 0 for i in range(n_layers)] if window else [False] * n_layers
    else:
        sliding = [bool(window)] * n_layers
    theta = float(get("rope.freq_base", 1_000_000.0 if gemma else 10_000.0))
    rope = RopeSpec(theta=theta)
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope = RopeSpec(theta=theta, scaling="linear", factor=float(get("rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise BadModelFile(f"rope scaling '{scaling}' is not supported by the native engine")
    # Gemma 3 27B scales queries by hidden/heads, the others by head_dim (as llama.cpp does).
    pre_attn = hidden / n_heads if gemma and n_layers == 62 else head_dim
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if isinstance(meta.get(k), int)]
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(get("context_length", 4096)),
        rope=rope,
        rope_local=RopeSpec(theta=GEMMA3_LOCAL_ROPE_BASE) if gemma else None,
        sliding_window=int(window) if window and any(sliding) else None,
        sliding_layers=sliding,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        tie_embeddings="output.weight" not in tensor_names,
        activation="gelu_tanh" if gemma else "silu",
        attn_scale=pre_attn**-0.5 if gemma else 0.0,
        embed_scale=math.sqrt(hidden) if gemma else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos,
    )
