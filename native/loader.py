"""Weights from a GGUF file or a Hugging Face folder, as float tensors under HF names.

Both sources end in the same place: a `ModelConfig` and a dict of tensors named
the way transformers names them (`model.layers.3.self_attn.q_proj.weight`), in
transformers' conventions. So the models have one way to take weights, and a
GGUF load can be checked against transformers' own GGUF load term by term.

GGUF conventions undone here:
- tensor names (`blk.3.attn_q.weight`) are mapped per architecture;
- llama.cpp permutes Llama's Q and K rows for its interleaved rotary layout;
  the inverse permutation restores HF's half-split layout;
- Gemma norm weights are stored as 1 + w (HF stores w), so 1 is taken off.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from localllm.core.errors import BadModelFile, ModelNotFound

from localllm.core.model_config import ModelConfig, from_gguf, from_hf, read_hf_config, safetensors_files
from .gguf_dequant import dequantize


@dataclass
class LoadedWeights:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names, float32 unless the file says otherwise
    source: str  # "gguf" or "safetensors"


def load_weights(path: Path) -> LoadedWeights:
    """Read the model at `path`: a .gguf file or a folder with config.json and *.safetensors."""
    path = Path(path)
    if path.is_dir():
        return load_hf_folder(path)
    if path.is_file():
        return load_gguf(path)
    raise ModelNotFound(f"{path} does not exist")


def load_config(path: Path) -> ModelConfig:
    """Only the model's shape, from headers: enough to plan memory before any weight is read."""
    path = Path(path)
    if path.is_dir():
        from safetensors import safe_open

        names: set[str] = set()
        for file in safetensors_files(path):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    names.update(_hf_name(n) for n in handle.keys())
            except (OSError, ValueError, RuntimeError) as exc:
                raise BadModelFile(f"{file.name} could not be read ({exc})") from None
        return _hf_config(path, has_lm_head="lm_head.weight" in names)
    if path.is_file():
        return _gguf_config(path)[1]
    raise ModelNotFound(f"{path} does not exist")


# -- GGUF -------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# per-layer GGUF names -> HF names, for the parts all families share
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# where the families differ: Gemma 3 has four norms per layer, Llama two
_GGUF_LAYER_BY_FAMILY = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_IGNORED_GGUF = {"rope_freqs.weight"}  # read into the config, not a module weight


def gguf_to_hf_name(name: str, family: str) -> str | None:
    """The HF name of a GGUF tensor, or None for tensors the engine does not use."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _BLK.match(name)
    if not m:
        return None
    layer, part, kind = m.groups()
    hf = _GGUF_LAYER_BY_FAMILY[family].get(part) or _GGUF_LAYER.get(part)
    return f"model.layers.{layer}.{hf}.{kind}" if hf else None


def load_gguf(path: Path) -> LoadedWeights:
    infos, config = _gguf_config(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def read(name: str) -> torch.Tensor:
        info = infos[name]
        raw = torch.from_numpy(np.array(data[info.offset : info.offset + info.n_bytes]))
        return dequantize(raw, info.type_name, tuple(reversed(info.shape)), name=name)

    if "rope_freqs.weight" in infos:
        config.rope.freq_divisors = read("rope_freqs.weight").tolist()
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    for name in infos:
        hf = gguf_to_hf_name(name, config.family)
        if hf is None:
            if name not in _IGNORED_GGUF:
                unknown.append(name)
            continue
        tensors[hf] = _from_gguf_convention(read(name), hf, config)
    if unknown:
        raise BadModelFile(f"{path.name}: tensors the native engine does not know: {', '.join(unknown[:5])}")
    return LoadedWeights(config, tensors, "gguf")


def _gguf_config(path: Path):
    from localllm.core.gguf_reader import read_gguf

    gguf = read_gguf(path)
    infos = {t.name: t for t in gguf.tensors}
    embd = infos.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise BadModelFile(f"{path.name} has no token embedding table (token_embd.weight)")
    return infos, from_gguf(gguf.metadata, set(infos), vocab_size=embd.shape[1])  # ggml order: (hidden, vocab)


def _from_gguf_convention(t: torch.Tensor, hf_name: str, config: ModelConfig) -> torch.Tensor:
    if config.architecture == "llama":
        if hf_name.endswith("self_attn.q_proj.weight") or hf_name.endswith("self_attn.q_proj.bias"):
            return _unpermute_rows(t, config.n_heads)
        if hf_name.endswith("self_attn.k_proj.weight") or hf_name.endswith("self_attn.k_proj.bias"):
            return _unpermute_rows(t, config.n_kv_heads)
    if config.family == "gemma3" and hf_name.endswith("norm.weight"):
        return t - 1.0
    return t


def _unpermute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, (pairs, 2) -> (2, pairs)."""
    rows = t.shape[0]
    rest = t.shape[1:]
    return t.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


# -- Hugging Face folder ------------------------------------------------------------

# Prefixes under which multimodal checkpoints keep the language model's weights.
_HF_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))


def load_hf_folder(folder: Path) -> LoadedWeights:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    tensors[_hf_name(name)] = handle.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise BadModelFile(f"{file.name} could not be read ({exc})") from None
    tensors = {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))}
    return LoadedWeights(_hf_config(folder, has_lm_head="lm_head.weight" in tensors), tensors, "safetensors")


def from_state_dict(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> LoadedWeights:
    """Weights already in memory under transformers' names (a model built in-process, e.g. random weights of a
    real shape for a GPU benchmark, where nothing can be downloaded). Tensors are used as they are, not copied."""
    tensors = {_hf_name(k): v for k, v in state_dict.items()}
    tensors = {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))}
    config = from_hf(hf_config, has_lm_head="lm_head.weight" in tensors)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return LoadedWeights(config, tensors, "memory")


def _hf_config(folder: Path, *, has_lm_head: bool) -> ModelConfig:
    """config.json, plus the end-of-generation ids generation_config.json adds (chat models list several)."""
    config = from_hf(read_hf_config(folder), has_lm_head=has_lm_head)
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            extra = json.loads(generation.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            extra = None
        for tok in [extra] if isinstance(extra, int) else (extra or []):
            if isinstance(tok, int) and tok not in config.eos_token_ids:
                config.eos_token_ids.append(tok)
    return config


def _hf_name(name: str) -> str:
    for prefix, replacement in _HF_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name


def take(tensors: dict[str, torch.Tensor], name: str, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Pop one tensor converted for the engine, with a clear error when the file lacks it."""
    if name not in tensors:
        raise BadModelFile(f"the model file lacks the tensor {name}")
    return tensors.pop(name).to(device=device, dtype=dtype)

