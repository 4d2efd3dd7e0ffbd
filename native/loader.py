"""Model files to a config and a tensor source under HF names; the weight formats the engine stores.

Both kinds of file end in the same place: a `ModelConfig` and a `TensorSource`
(tensor_source.py) that presents the tensors named the way transformers names
them (`model.layers.3.self_attn.q_proj.weight`), in transformers' conventions,
and reads them a slice at a time. So the models have one way to take weights,
and a GGUF load can be checked against transformers' own GGUF load term by term.
Nothing is read here beyond headers: the model's `load_weights` pulls each
tensor into its parameter (see placement.py).

GGUF conventions the source undoes: tensor names (`blk.3.attn_q.weight`) are
mapped per architecture here; Llama's Q/K row permutation and Gemma's 1 + w
norms are undone per slice there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from localllm.core.errors import BadModelFile, BadRequest, ModelNotFound

from localllm.core import weight_formats as formats
from localllm.core.weight_formats import LOAD_WORKING_BYTES, WEIGHT_FORMATS
from localllm.core.model_config import ModelConfig, from_gguf, from_hf, read_hf_config, safetensors_files
from .tensor_source import GGUFSource, MemorySource, SafetensorsSource, TensorSource

__all__ = ["LOAD_WORKING_BYTES", "LoadedWeights", "load_weights", "load_config", "from_state_dict", "load_working_bytes"]


@dataclass
class LoadedWeights:
    config: ModelConfig
    tensors: TensorSource  # HF names; read a slice at a time into the model's parameters
    source: str  # "gguf", "safetensors" or "memory"


def load_weights(path: Path) -> LoadedWeights:
    """Open the model at `path` (a .gguf file or a folder with config.json and *.safetensors); reads headers only."""
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
        names = _hf_tensor_names(path)
        return _hf_config(path, has_lm_head="lm_head.weight" in names)
    if path.is_file():
        return _gguf_config(path)[1]
    raise ModelNotFound(f"{path} does not exist")


# -- weight formats ------------------------------------------------------------------

# GGUF types whose blocks an integer kernel keeps as they are (what `auto` keeps on CUDA)
_KEPT_BY_AUTO = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8"}


def check_weights(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise BadRequest(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got '{weights}'")
    return weights


def compute_dtype(weights: str) -> torch.dtype:
    """The dtype activations run in: a float format's own; bfloat16 for the integer and fp8 kernels."""
    return torch.float32 if weights == "float32" else torch.bfloat16


def cpu_runs_bfloat16_fast() -> bool:
    """AVX-512 BF16 or AMX: the processor multiplies bfloat16 natively (elsewhere float32 is faster)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch's own dispatch checks
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return False


def resolve_weights(weights: str, device: torch.device | str, dominant_type: str | None) -> str:
    """`auto` made concrete for this device and file. `dominant_type` is the GGUF type most of the
    linear weights' bytes are stored in (None for other files)."""
    check_weights(weights)
    if weights != "auto":
        return weights
    if torch.device(device).type == "cuda":
        return _KEPT_BY_AUTO.get(dominant_type or "", "bfloat16")
    return "bfloat16" if cpu_runs_bfloat16_fast() else "float32"


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_precision(weights: str, dtype: torch.dtype | None, device: torch.device | str,
                      tensors: TensorSource) -> tuple[str, torch.dtype]:
    """(weight format, compute dtype) for a load. An explicit `dtype` with `auto` keeps float weights in it;
    a float format computes in itself and the quantized ones in bfloat16, so a `dtype` that says otherwise
    is refused rather than ignored."""
    check_weights(weights)
    if weights == "auto" and dtype is not None:
        return _DTYPE_NAMES.get(dtype, str(dtype)), dtype
    if weights == "auto":
        weights = resolve_weights(weights, device, dominant_linear_type(tensors) if torch.device(device).type == "cuda" else None)
    wanted = compute_dtype(weights)
    if dtype is not None and dtype != wanted:
        raise BadRequest(f"weights {weights} compute in {_DTYPE_NAMES[wanted]}, not {_DTYPE_NAMES.get(dtype, dtype)}")
    return weights, wanted


def load_working_bytes(config: ModelConfig, weights: str) -> int:
    """Host bytes loading `config` in `weights` needs beyond the resident weights (core/weight_formats.py)."""
    c = config
    fused = max((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, 2 * c.intermediate_size) * c.hidden_size
    return formats.load_working_bytes(weights, table_values=c.vocab_size * c.hidden_size, largest_fused_values=fused)


def dominant_linear_type(tensors: TensorSource) -> str | None:
    """The GGUF type holding most bytes of the layers' linear weights (None when the file is not GGUF)."""
    counts: dict[str, int] = {}
    for name in tensors.names():
        if name.startswith("model.layers.") and name.endswith("proj.weight") and tensors.raw(name) is not None:
            kind = tensors.type_name(name)
            size = 1
            for dim in tensors.shape(name):
                size *= dim
            counts[kind] = counts.get(kind, 0) + size
    return max(counts, key=counts.get) if counts else None


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
    by_hf = {}
    unknown = []
    for name, info in infos.items():
        hf = gguf_to_hf_name(name, config.family)
        if hf is None:
            if name not in _IGNORED_GGUF:
                unknown.append(name)
            continue
        by_hf[hf] = info
    if unknown:
        raise BadModelFile(f"{path.name}: tensors the native engine does not know: {', '.join(unknown[:5])}")
    qk_heads = {}
    if config.architecture == "llama":  # llama.cpp permuted these rows for its rotary layout
        for hf in by_hf:
            if ".self_attn.q_proj." in hf:
                qk_heads[hf] = config.n_heads
            elif ".self_attn.k_proj." in hf:
                qk_heads[hf] = config.n_kv_heads
    source = GGUFSource(path, by_hf, qk_heads=qk_heads, norm_offset=1.0 if config.family == "gemma3" else 0.0)
    if "rope_freqs.weight" in infos:
        rope = GGUFSource(path, {"rope_freqs": infos["rope_freqs.weight"]})
        config.rope.freq_divisors = rope.read("rope_freqs", torch.float32).tolist()
        rope.close()
    return LoadedWeights(config, source, "gguf")


def _gguf_config(path: Path):
    from localllm.core.gguf_reader import read_gguf

    gguf = read_gguf(path)
    infos = {t.name: t for t in gguf.tensors}
    embd = infos.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise BadModelFile(f"{path.name} has no token embedding table (token_embd.weight)")
    return infos, from_gguf(gguf.metadata, set(infos), vocab_size=embd.shape[1])  # ggml order: (hidden, vocab)


# -- Hugging Face folder ------------------------------------------------------------

# Prefixes under which multimodal checkpoints keep the language model's weights.
_HF_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))


def _hf_tensor_names(folder: Path) -> dict[str, tuple[Path, str]]:
    """HF name -> (file, name in the file) for the language model's tensors of every *.safetensors file."""
    from safetensors import safe_open

    names: dict[str, tuple[Path, str]] = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for stored in handle.keys():
                    names[_hf_name(stored)] = (file, stored)
        except (OSError, ValueError, RuntimeError) as exc:
            raise BadModelFile(f"{file.name} could not be read ({exc})") from None
    return {k: v for k, v in names.items() if k.startswith(("model.", "lm_head."))}


def load_hf_folder(folder: Path) -> LoadedWeights:
    names = _hf_tensor_names(folder)
    config = _hf_config(folder, has_lm_head="lm_head.weight" in names)
    return LoadedWeights(config, SafetensorsSource(names), "safetensors")


def from_state_dict(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> LoadedWeights:
    """Weights already in memory under transformers' names (a model built in-process, e.g. random weights of a
    real shape for a GPU benchmark, where nothing can be downloaded). A tensor already in the engine's dtype and
    device is used as it is, not copied."""
    tensors = {_hf_name(k): v for k, v in state_dict.items()}
    tensors = {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))}
    config = from_hf(hf_config, has_lm_head="lm_head.weight" in tensors)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return LoadedWeights(config, MemorySource(tensors), "memory")


def unsupported_quantization(cfg: dict) -> str | None:
    """The quantization a config.json declares (AWQ, GPTQ, bitsandbytes, fp8, ...), or None. The engine
    reads none of them: their packed tensors and scales are not plain weights."""
    for section in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        q = section.get("quantization_config")
        if q is not None:
            if isinstance(q, dict):
                method = q.get("quant_method") or q.get("format") or ("bitsandbytes" if "load_in_4bit" in q else None)
                return str(method or "an unnamed method")
            return "an unnamed method"
    return None


def _hf_config(folder: Path, *, has_lm_head: bool) -> ModelConfig:
    """config.json, plus the end-of-generation ids generation_config.json adds (chat models list several)."""
    raw = read_hf_config(folder)
    method = unsupported_quantization(raw)
    if method is None and (folder / "quantize_config.json").is_file():  # AutoGPTQ's older layout
        method = "gptq"
    if method is not None:
        raise BadModelFile(f"{folder.name} is quantized with {method}, which the native engine does not read")
    config = from_hf(raw, has_lm_head=has_lm_head)
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
