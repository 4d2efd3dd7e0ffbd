"""What a model file is, in the terms the rest of localllm needs.

ModelInfo is read once from a GGUF header (fast: see gguf_reader) and cached
as a dict in the store's manifest. It carries the sizes a fit planner needs
(weights per layer, KV cache per token and layer) and what `show` prints.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from localllm.core.errors import BadModelFile
from localllm.core.gguf_reader import GGML_TYPES, ArrayInfo, GGUFFile, TensorInfo, clipped, read_gguf, shown

# general.file_type (llama.cpp's llama_ftype) -> the name llama.cpp's quantize uses.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_1_SOME_F16", 7: "Q8_0", 8: "Q5_0",
    9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS",
    21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S",
    27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}
FILE_TYPE_GUESSED = 1024
EMBEDDING_POOLING_TYPES = (1, 2, 3)  # mean, CLS, last token (4, rank, is a reranker's)  # flag llama.cpp ors in when the type was inferred

BOS_KEY = "tokenizer.ggml.bos_token_id"
EOS_KEY = "tokenizer.ggml.eos_token_id"

_LAYER = re.compile(r"blk\.(\d+)\.")
# Per-layer lists are sized from block_count and tensor names, so both are capped: the deepest
# published models have a few hundred layers.
MAX_LAYERS = 4096
LATER_FIELDS = ("intermediate_size", "layer_repack_bytes", "pooling_type", "system_prompt", "expert_count", "reasoning")  # cached manifests may predate these

# ggml types whose matrices llama.cpp's CPU backend repacks (x86 AVX2 and ARM both), and the
# row multiple it needs; the copy lives in a CPU_REPACK buffer beside the mapped file.
REPACKED_TYPES = {2, 12, 20}  # Q4_0, Q4_K, IQ4_NL
REPACK_ROWS = 8


def repack_bytes(t: TensorInfo) -> int:
    """Bytes of the interleaved copy llama.cpp makes of a layer matrix on the CPU (0 for most)."""
    if t.ggml_type in REPACKED_TYPES and len(t.shape) == 2 and t.shape[1] % REPACK_ROWS == 0:
        return t.n_bytes
    return 0


@dataclass
class ModelInfo:
    """A model's shape and sizes, as read from its file header."""

    path: Path
    format: str
    architecture: str
    model_name: str | None
    parameters: int
    quantization: str
    size_bytes: int
    context_length: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    sliding_window: int | None
    sliding_window_layers: list[int]
    rope_freq_base: float | None
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool
    layer_weight_bytes: list[int] = field(default_factory=list)
    token_embd_bytes: int = 0
    output_bytes: int = 0  # 0 when the output projection is tied to the embedding
    other_bytes: int = 0
    intermediate_size: int = 0  # feed-forward width (0: unknown); sizes activation buffers
    # Bytes per layer of the matrices llama.cpp's CPU backend copies into an interleaved
    # layout at load (Q4_0, Q4_K, IQ4_NL): RAM they take twice while the layer runs on the CPU.
    layer_repack_bytes: list[int] = field(default_factory=list)
    # `{arch}.pooling_type` (llama.cpp's enum: 1 mean, 2 CLS, 3 last, 4 rank); set by embedding
    # models, absent (None) or 0 for chat models
    pooling_type: int | None = None
    # A system prompt the installed model carries (Ollama's Modelfile SYSTEM, kept in its
    # manifest): chats that send no system message get it. Never read from a file.
    system_prompt: str | None = None
    # `{arch}.expert_count`: experts per layer of a mixture of experts (0: dense). llama.cpp runs
    # them; the native engine does not, so the fit planner plans them for llama.cpp only.
    expert_count: int = 0
    # Whether the model reasons, where its catalog entry says so (None: not a catalog model; then
    # its template tells, core/reasoning.py). Never read from a file.
    reasoning: bool | None = None

    @property
    def is_embedding_model(self) -> bool:
        """A model made to embed (it pools its states into one vector), not to generate text."""
        return self.pooling_type in EMBEDDING_POOLING_TYPES

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0

    @property
    def weight_bytes(self) -> int:
        layers = sum(self.layer_weight_bytes)
        return layers + self.token_embd_bytes + self.output_bytes + self.other_bytes

    def kv_bytes(self, context: int, dtype_bytes: float = 2) -> int:
        """Bytes of K and V cache for `context` tokens.

        Sliding-window layers keep at most `sliding_window` tokens, which is
        what makes long contexts cheap on Gemma. n_kv_heads is the maximum
        over layers, so this errs high for files with per-layer head counts.
        """
        per_token = self.n_kv_heads * self.head_dim * 2 * dtype_bytes  # 2: K and V
        sliding = set(self.sliding_window_layers)
        total = 0.0
        for layer in range(self.n_layers):
            if layer in sliding and self.sliding_window:
                total += per_token * min(context, self.sliding_window)
            else:
                total += per_token * context
        return math.ceil(total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for caching in a manifest."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        """Inverse of to_dict; a ValueError means a stale cache entry: re-read the file.

        The fit planner's later additions (LATER_FIELDS) may be absent from an
        older cache: they take their defaults rather than force a re-read,
        which for a split GGUF would see only its first part.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n not in LATER_FIELDS]
        if missing:
            raise ValueError(f"model info lacks {', '.join(missing)}")
        values = {n: d[n] for n in names if n in d}
        values["path"] = Path(values["path"])
        values["sliding_window_layers"] = list(values["sliding_window_layers"])
        for name in ("layer_weight_bytes", "layer_repack_bytes"):
            if name in values:
                values[name] = list(values[name])
        return cls(**values)


def read_model_info(path: Path) -> ModelInfo:
    """Read a GGUF file's header into a ModelInfo.

    Raises ModelNotFound for a missing path and BadModelFile for anything
    that is not a complete, sane GGUF model.
    """
    path = Path(path)
    gguf = read_gguf(path, want_tokens=(BOS_KEY, EOS_KEY))
    return _model_info(gguf)


def add_split_part(info: ModelInfo, tensors: list[TensorInfo]) -> None:
    """Count the tensors of a later part of a split GGUF (part 1 holds all the metadata) into `info`."""
    for t in tensors:
        info.parameters += t.n_elements
        m = _LAYER.match(t.name)
        if m:
            i = _layer_index(info.path, t.name, m)
            for sizes in (info.layer_weight_bytes, info.layer_repack_bytes):
                if i >= len(sizes):
                    sizes.extend([0] * (i + 1 - len(sizes)))
            info.layer_weight_bytes[i] += t.n_bytes
            info.layer_repack_bytes[i] += repack_bytes(t)
        elif t.name == "token_embd.weight":
            info.token_embd_bytes += t.n_bytes
        elif t.name == "output.weight":
            info.output_bytes += t.n_bytes
        else:
            info.other_bytes += t.n_bytes


def model_info_from_header(gguf: GGUFFile) -> ModelInfo:
    """A ModelInfo from an already parsed header (e.g. the first bytes of a remote file)."""
    return _model_info(gguf)


def show_dict(info: ModelInfo, name: str, chat_template_source: str | None) -> dict[str, Any]:
    """The fields `show` prints, in a fixed order (also the JSON shape of the API)."""
    return {
        "name": name,
        "path": str(info.path),
        "format": info.format,
        "architecture": info.architecture,
        "parameters": info.parameters,
        "quantization": info.quantization,
        "size_bytes": info.size_bytes,
        "context_length": info.context_length,
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "n_kv_heads": info.n_kv_heads,
        "head_dim": info.head_dim,
        "sliding_window": info.sliding_window,
        "vocab_size": info.vocab_size,
        "has_chat_template": info.chat_template is not None,
        "chat_template_source": chat_template_source,
    }


# -- building ModelInfo -----------------------------------------------------

_MISSING: Any = object()


def _model_info(g: GGUFFile) -> ModelInfo:
    meta = g.metadata
    arch = _get(g, "general.architecture", str)
    n_layers = _int(g, f"{arch}.block_count")
    hidden = _int(g, f"{arch}.embedding_length")
    n_heads = _int(g, f"{arch}.attention.head_count")
    n_kv_heads = _int(g, f"{arch}.attention.head_count_kv", n_heads)
    if not 0 < n_layers <= MAX_LAYERS or hidden <= 0 or n_heads <= 0:
        raise BadModelFile(
            f"{g.path}: implausible model shape ({n_layers} layers, {n_heads} heads, width {hidden};"
            f" at most {MAX_LAYERS} layers)"
        )
    head_dim = _int(g, f"{arch}.attention.key_length", hidden // n_heads)
    window = _int(g, f"{arch}.attention.sliding_window", 0) or None

    tensors = {t.name: t for t in g.tensors}
    layer_bytes = [0] * n_layers
    layer_repack = [0] * n_layers
    token_embd = tensors.get("token_embd.weight")
    output = tensors.get("output.weight")
    other = 0
    for t in g.tensors:
        m = _LAYER.match(t.name)
        if m:
            i = _layer_index(g.path, t.name, m)
            if i >= len(layer_bytes):  # e.g. extra prediction layers beyond block_count
                layer_bytes.extend([0] * (i + 1 - len(layer_bytes)))
                layer_repack.extend([0] * (i + 1 - len(layer_repack)))
            layer_bytes[i] += t.n_bytes
            layer_repack[i] += repack_bytes(t)
        elif t is not token_embd and t is not output:
            other += t.n_bytes

    template = meta.get("tokenizer.chat_template")
    bos_id = _int(g, BOS_KEY, None)
    eos_id = _int(g, EOS_KEY, None)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
    rope = meta.get(f"{arch}.rope.freq_base")

    return ModelInfo(
        path=g.path,
        format="gguf",
        architecture=arch,
        model_name=meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        parameters=sum(t.n_elements for t in g.tensors),
        quantization=_quantization(g),
        size_bytes=g.file_size,
        context_length=_int(g, f"{arch}.context_length"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=_vocab_size(g, arch, token_embd),
        sliding_window=window,
        sliding_window_layers=_sliding_layers(g, arch, n_layers, window),
        rope_freq_base=float(rope) if _is_number(rope) else None,
        chat_template=template if isinstance(template, str) else None,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        bos_token=g.token_strings.get(bos_id) if bos_id is not None else None,
        eos_token=g.token_strings.get(eos_id) if eos_id is not None else None,
        add_bos_token=add_bos if isinstance(add_bos, bool) else True,
        layer_weight_bytes=layer_bytes,
        token_embd_bytes=token_embd.n_bytes if token_embd else 0,
        output_bytes=output.n_bytes if output else 0,
        other_bytes=other,
        intermediate_size=_int(g, f"{arch}.feed_forward_length", 0),
        layer_repack_bytes=layer_repack,
        pooling_type=_int(g, f"{arch}.pooling_type", None),
        expert_count=_int(g, f"{arch}.expert_count", 0),
    )


def _layer_index(path: Path, name: str, match: re.Match[str]) -> int:
    """The layer a "blk.N." tensor belongs to, refusing N past MAX_LAYERS before lists grow to it."""
    digits = match.group(1)
    if len(digits) > 6 or int(digits) >= MAX_LAYERS:
        raise BadModelFile(f"{path}: tensor {shown(name)} is in a layer past {MAX_LAYERS}")
    return int(digits)


def _get(g: GGUFFile, key: str, kind: type, default: Any = _MISSING) -> Any:
    value = g.metadata.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise BadModelFile(f"{g.path}: GGUF metadata lacks {clipped(key)}")
        return default
    if not isinstance(value, kind):
        raise BadModelFile(f"{g.path}: GGUF metadata {clipped(key)} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _int(g: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """An integer key; per-layer arrays (some files vary heads by layer) give their max."""
    value = g.metadata.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise BadModelFile(f"{g.path}: GGUF metadata lacks {clipped(key)}")
        return default
    if isinstance(value, list) and value and all(_is_int(v) for v in value):
        return max(value)
    if not _is_int(value):
        raise BadModelFile(f"{g.path}: GGUF metadata {clipped(key)} is not an integer")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _quantization(g: GGUFFile) -> str:
    """llama.cpp's name for general.file_type, else the commonest weight-matrix type."""
    ftype = g.metadata.get("general.file_type")
    if _is_int(ftype):
        name = FILE_TYPES.get(ftype & ~FILE_TYPE_GUESSED)
        if name:
            return name
    # Count matrices only: 1-D norms and biases are F32 in every file and would
    # outvote the real quantization.
    counts: dict[int, int] = {}
    for t in g.tensors:
        if len(t.shape) >= 2:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    if not counts:
        return "unknown"
    return GGML_TYPES[max(counts, key=counts.__getitem__)][0]


def _vocab_size(g: GGUFFile, arch: str, token_embd: Any) -> int:
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, ArrayInfo)):
        return len(tokens)
    size = g.metadata.get(f"{arch}.vocab_size")
    if _is_int(size):
        return size
    if token_embd is not None and len(token_embd.shape) >= 2:
        return token_embd.shape[1]  # ggml order: (hidden, vocab)
    return 0


def _sliding_layers(g: GGUFFile, arch: str, n_layers: int, window: int | None) -> list[int]:
    """Which layers attend through the sliding window.

    GGUF files rarely say so explicitly; llama.cpp hard-codes the pattern per
    architecture, and so must we: Gemma 3 interleaves five local layers with
    one global (indices 5, 11, 17... are global), Gemma 2 alternates starting
    with a local layer, and other architectures that declare a window
    (Mistral-style) slide on every layer. A file that carries
    sliding_window_pattern overrides all that: a per-layer bool array, or an
    int n meaning "the last layer of every n is global" (0: all slide).
    """
    if not window:
        return []
    pattern = g.metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [i for i, slides in enumerate(pattern[:n_layers]) if slides]
    if _is_int(pattern):
        period = pattern
    elif arch == "gemma3":
        period = 6
    elif arch == "gemma2":
        period = 2
    else:
        period = 0
    if period <= 0:
        return list(range(n_layers))
    return [i for i in range(n_layers) if i % period < period - 1]
