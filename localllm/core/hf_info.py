"""ModelInfo for a Hugging Face model folder (config.json, *.safetensors, tokenizer files).

The GGUF path reads a file header (localllm/core/modelinfo.py); this is the same for
a folder: config.json for the shape, the safetensors headers for sizes (each
file starts with an 8-byte length and a JSON table of its tensors, so no
weights are read), tokenizer_config.json for BOS/EOS and the chat template.
No torch here: `show`, `ls` and the fit planner use it without the engine.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from localllm.core.errors import BadModelFile
from localllm.core.modelinfo import ModelInfo

from localllm.core.model_config import from_hf, read_hf_config, safetensors_files

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_LAYER = re.compile(r"layers\.(\d+)\.")
MAX_HEADER = 100 * 2**20


def read_hf_model_info(folder: Path) -> ModelInfo:
    folder = Path(folder)
    cfg = read_hf_config(folder)
    tensors = _safetensors_tables(folder)
    config = from_hf(cfg, has_lm_head=any(n.endswith("lm_head.weight") for n in tensors))
    settings = read_tokenizer_config(folder)
    layer_bytes = [0] * config.n_layers
    embd = output = other = 0
    parameters = 0
    dtypes: dict[str, int] = {}
    for name, (dtype, n_elements, n_bytes) in tensors.items():
        parameters += n_elements
        dtypes[dtype] = dtypes.get(dtype, 0) + n_bytes
        m = _LAYER.search(name)
        if m and int(m.group(1)) < config.n_layers:
            layer_bytes[int(m.group(1))] += n_bytes
        elif name.endswith("embed_tokens.weight"):
            embd += n_bytes
        elif name.endswith("lm_head.weight"):
            output += n_bytes
        else:
            other += n_bytes
    bos, eos = settings.get("bos_token"), settings.get("eos_token")
    vocab = _vocab(folder)
    template = settings.get("chat_template")
    return ModelInfo(
        path=folder,
        format="safetensors",
        architecture=config.architecture,
        model_name=folder.name,
        parameters=parameters,
        quantization=max(dtypes, key=dtypes.__getitem__) if dtypes else "unknown",
        size_bytes=sum(f.stat().st_size for f in safetensors_files(folder)),
        context_length=config.max_position,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        sliding_window=config.sliding_window,
        sliding_window_layers=[i for i, s in enumerate(config.sliding_layers) if s and config.sliding_window],
        rope_freq_base=config.rope.theta,
        chat_template=template if isinstance(template, str) else None,
        bos_token_id=vocab.get(bos) if isinstance(bos, str) else config.bos_token_id,
        eos_token_id=vocab.get(eos) if isinstance(eos, str) else (config.eos_token_ids or [None])[0],
        bos_token=bos if isinstance(bos, str) else None,
        eos_token=eos if isinstance(eos, str) else None,
        add_bos_token=bool(settings.get("add_bos_token", isinstance(bos, str))),
        layer_weight_bytes=layer_bytes,
        token_embd_bytes=embd,
        output_bytes=output,
        other_bytes=other,
        intermediate_size=config.intermediate_size,
    )


def _safetensors_tables(folder: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (dtype, elements, bytes) from every safetensors header in the folder."""
    found: dict[str, tuple[str, int, int]] = {}
    for file in safetensors_files(folder):
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > MAX_HEADER:
                    raise ValueError(f"header of {length} bytes")
                table = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise BadModelFile(f"{file} is not a readable safetensors file ({exc})") from None
        for name, entry in table.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            n = 1
            for dim in entry.get("shape", []):
                n *= int(dim)
            start, end = entry.get("data_offsets", (0, 0))
            found[name] = (str(entry.get("dtype")), n, int(end) - int(start))
    return found


def _vocab(folder: Path) -> dict[str, int]:
    """Special tokens' ids from tokenizer.json's added tokens (enough for BOS/EOS)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return {}
    try:
        spec = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return {t["content"]: t["id"] for t in spec.get("added_tokens", []) if "content" in t and "id" in t}


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json with its special tokens reduced to strings, plus a chat_template.jinja if present."""
    settings: dict = {}
    file = folder / "tokenizer_config.json"
    if file.is_file():
        try:
            settings = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise BadModelFile(f"{file} is not valid JSON ({exc})") from None
    for key in ("bos_token", "eos_token"):
        value = settings.get(key)
        if isinstance(value, dict):
            settings[key] = value.get("content")
    template = folder / "chat_template.jinja"
    if not isinstance(settings.get("chat_template"), str) and template.is_file():
        settings["chat_template"] = template.read_text()
    return settings
