"""ModelInfo and the GGUF reader, pinned on the real starter and on tiny synthetic files.

Expected starter values were verified once against the `gguf` package's
GGUFReader (too slow on this vocabulary to run in every test session).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from localllm.core.errors import BadModelFile, ModelNotFound
from localllm.core.gguf_reader import ArrayInfo, read_gguf, tensor_nbytes
from localllm.core.modelinfo import ModelInfo, read_model_info, show_dict

STARTER_SIZE = 253_113_024
STARTER_DATA_OFFSET = 6_525_120
STARTER_PARAMETERS = 268_098_176


# -- the starter -------------------------------------------------------------


@pytest.fixture(scope="module")
def info(starter_gguf: Path) -> ModelInfo:
    return read_model_info(starter_gguf)


def test_starter_shape(info: ModelInfo, starter_gguf: Path) -> None:
    assert info.path == starter_gguf
    assert info.format == "gguf"
    assert info.architecture == "gemma3"
    assert info.model_name == "Gemma 3 270m"
    assert info.n_layers == 18
    assert info.n_heads == 4
    assert info.n_kv_heads == 1
    assert info.head_dim == 256
    assert info.hidden_size == 640
    assert info.context_length == 32768
    assert info.vocab_size == 262144
    assert info.rope_freq_base == 1_000_000.0


def test_starter_sliding_window(info: ModelInfo) -> None:
    assert info.sliding_window == 512
    assert info.sliding_window_layers == [i for i in range(18) if i not in (5, 11, 17)]


def test_starter_quantization_and_sizes(info: ModelInfo) -> None:
    assert info.quantization == "Q4_K_M"
    assert info.size_bytes == STARTER_SIZE
    assert info.parameters == STARTER_PARAMETERS
    assert 267_000_000 < info.parameters < 269_000_000
    assert info.token_embd_bytes == 178_257_920  # 262144 x 640 in Q8_0
    assert info.output_bytes == 0  # tied to the embedding
    assert info.other_bytes == 2560  # output_norm.weight, 640 x F32
    assert len(info.layer_weight_bytes) == 18
    assert set(info.layer_weight_bytes) == {3_995_648, 3_596_288}
    # Header plus tensor data fill the file exactly.
    assert info.weight_bytes == 246_587_904
    assert STARTER_DATA_OFFSET + info.weight_bytes <= info.size_bytes


def test_starter_tokenizer(info: ModelInfo) -> None:
    assert info.chat_template is None
    assert info.bos_token_id == 2 and info.bos_token == "<bos>"
    assert info.eos_token_id == 1 and info.eos_token == "<eos>"
    assert info.add_bos_token is True


def test_starter_reads_fast(starter_gguf: Path) -> None:
    read_model_info(starter_gguf)  # warm the page cache
    start = time.perf_counter()
    read_model_info(starter_gguf)
    assert time.perf_counter() - start < 1.0


def test_starter_raw_header(starter_gguf: Path) -> None:
    g = read_gguf(starter_gguf, want_tokens={0, 1, 2, 3, 262143, 10**9})
    assert g.version == 3
    assert g.alignment == 32
    assert g.data_offset == STARTER_DATA_OFFSET
    assert g.token_strings == {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 262143: "<unused6241>"}
    assert g.metadata["tokenizer.ggml.tokens"] == ArrayInfo(type=8, length=262144, offset=979)
    assert g.metadata["tokenizer.ggml.scores"].length == 262144
    assert g.metadata["tokenizer.ggml.token_type"].length == 262144
    assert g.metadata["general.tags"] == ["gemma3", "gemma", "google", "text-generation"]
    assert g.metadata["general.file_type"] == 15
    assert len(g.tensors) == 236
    counts: dict[str, int] = {}
    for t in g.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    assert counts == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    by_name = {t.name: t for t in g.tensors}
    expected = {
        # name: (shape, type, absolute offset, bytes), as GGUFReader reports them
        "output_norm.weight": ((640,), "F32", 6_525_120, 2560),
        "token_embd.weight": ((640, 262144), "Q8_0", 6_527_680, 178_257_920),
        "blk.0.attn_k.weight": ((640, 256), "Q5_0", 184_785_600, 112_640),
        "blk.0.attn_output.weight": ((1024, 640), "Q4_K", 184_901_824, 368_640),
        "blk.0.attn_v.weight": ((640, 256), "Q8_0", 185_722_048, 174_080),
        "blk.0.ffn_down.weight": ((2048, 640), "Q6_K", 185_896_128, 1_075_200),
        "blk.17.post_ffw_norm.weight": ((640,), "F32", 253_110_464, 2560),
    }
    for name, (shape, type_name, offset, n_bytes) in expected.items():
        t = by_name[name]
        assert (t.shape, t.type_name, t.offset, t.n_bytes) == (shape, type_name, offset, n_bytes), name
    last = g.tensors[-1]
    assert last.offset + last.n_bytes == STARTER_SIZE


def test_kv_bytes(info: ModelInfo) -> None:
    # Per token and layer: 1 KV head x 256 dims x 2 (K and V) x 2 bytes (f16).
    per_token_layer = 1 * 256 * 2 * 2
    global_layers, sliding_layers = 3, 15
    expected = per_token_layer * (global_layers * 32768 + sliding_layers * 512)
    assert expected == 108_527_616
    assert info.kv_bytes(32768) == expected
    assert info.kv_bytes(32768, dtype_bytes=2) == expected
    # Below the window every layer holds the whole context.
    assert info.kv_bytes(100) == per_token_layer * 18 * 100


def test_round_trip(info: ModelInfo) -> None:
    d = json.loads(json.dumps(info.to_dict()))
    assert d["path"] == str(info.path)
    assert ModelInfo.from_dict(d) == info


def test_from_dict_rejects_stale_entries(info: ModelInfo) -> None:
    d = info.to_dict()
    del d["layer_weight_bytes"]
    with pytest.raises(ValueError):
        ModelInfo.from_dict(d)


def test_show_dict(info: ModelInfo) -> None:
    shown = show_dict(info, "gemma3-270m", "builtin:gemma")
    assert list(shown) == [
        "name", "path", "format", "architecture", "parameters", "quantization", "size_bytes",
        "context_length", "n_layers", "n_heads", "n_kv_heads", "head_dim", "sliding_window",
        "vocab_size", "has_chat_template", "chat_template_source",
    ]
    assert shown["name"] == "gemma3-270m"
    assert shown["sliding_window"] == 512
    assert shown["has_chat_template"] is False
    assert shown["chat_template_source"] == "builtin:gemma"
    json.dumps(shown)


# -- broken files ----------------------------------------------------------------


def _copy_head(src: Path, dst: Path, n: int) -> Path:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n))
    return dst


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        read_model_info(tmp_path / "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(BadModelFile):
        read_model_info(tmp_path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 10)
    with pytest.raises(BadModelFile, match="GGUF") as e:
        read_model_info(path)
    assert str(path) in str(e.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(BadModelFile, match="GGUF"):
        read_model_info(path)


def test_truncated_in_header(starter_gguf: Path, tmp_path: Path) -> None:
    # 1 MB ends inside the vocabulary.
    path = _copy_head(starter_gguf, tmp_path / "head.gguf", 1 << 20)
    with pytest.raises(BadModelFile) as e:
        read_model_info(path)
    assert str(path) in str(e.value)


def test_truncated_in_data(starter_gguf: Path, tmp_path: Path) -> None:
    # A whole header but only 90% of the file: pad the header out sparsely.
    path = _copy_head(starter_gguf, tmp_path / "short.gguf", STARTER_DATA_OFFSET)
    with open(path, "r+b") as f:
        f.truncate(STARTER_SIZE * 9 // 10)
    with pytest.raises(BadModelFile, match="truncated") as e:
        read_model_info(path)
    assert str(path) in str(e.value)


def test_corrupt_key_length_in_real_header(starter_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(_copy_head(starter_gguf, tmp_path / "x", 1 << 16).read_bytes())
    data[24:32] = struct.pack("<Q", 1 << 62)  # length of the first key
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(BadModelFile, match="a metadata key of 4611686018427387904 bytes"):
        read_model_info(path)


# -- synthetic files ---------------------------------------------------------------
#
# A tiny writer for the GGUF layout, so edge cases need no big downloads.

_SCALAR = {int: (4, "<I"), float: (6, "<f"), bool: (7, "<?")}


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _value(v: Any) -> tuple[int, bytes]:
    if isinstance(v, str):
        return 8, _str(v)
    if isinstance(v, list):
        etype, _ = _value(v[0])
        return 9, struct.pack("<IQ", etype, len(v)) + b"".join(_value(x)[1] for x in v)
    vtype, fmt = _SCALAR[type(v)]
    return vtype, struct.pack(fmt, v)


def _gguf(
    kvs: dict[str, Any],
    tensors: list[tuple[str, tuple[int, ...], int]] = (),  # type: ignore[assignment]
    version: int = 3,
    data_bytes: int | None = None,
) -> bytes:
    """kvs and (name, shape, ggml type) tensors, laid out back to back, 32-aligned."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, v in kvs.items():
        vtype, payload = _value(v)
        out += _str(key) + struct.pack("<I", vtype) + payload
    offset = 0
    for name, shape, gtype in tensors:
        out += _str(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, gtype, offset)
        offset += -(-tensor_nbytes(gtype, shape) // 32) * 32
    out += b"\0" * (-len(out) % 32)
    return out + b"\0" * (offset if data_bytes is None else data_bytes)


def _llm(arch: str = "llama", n_layers: int = 4, **extra: Any) -> dict[str, Any]:
    kvs: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.context_length": 4096,
        f"{arch}.block_count": n_layers,
        f"{arch}.embedding_length": 64,
        f"{arch}.attention.head_count": 4,
        "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    kvs.update({k.replace("ARCH", arch): v for k, v in extra.items()})
    return kvs


_TENSORS = [
    ("token_embd.weight", (64, 4), 1),
    ("blk.0.attn_q.weight", (64, 64), 0),
    ("blk.1.attn_q.weight", (64, 64), 8),
    ("output.weight", (64, 4), 0),
    ("output_norm.weight", (64,), 0),
]


def _write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_synthetic_defaults(tmp_path: Path) -> None:
    info = read_model_info(_write(tmp_path, _gguf(_llm(n_layers=2), _TENSORS)))
    assert info.architecture == "llama"
    assert info.model_name is None
    assert info.n_kv_heads == 4  # defaults to n_heads
    assert info.head_dim == 16  # 64 / 4
    assert info.vocab_size == 4
    assert (info.bos_token, info.eos_token) == ("<s>", "</s>")
    assert info.sliding_window is None and info.sliding_window_layers == []
    assert info.chat_template is None and info.rope_freq_base is None
    assert info.add_bos_token is True
    assert info.parameters == 64 * 4 * 2 + 64 * 64 * 2 + 64
    assert info.token_embd_bytes == 64 * 4 * 2
    assert info.layer_weight_bytes == [64 * 64 * 4, 64 * 64 // 32 * 34]
    assert info.output_bytes == 64 * 4 * 4
    assert info.other_bytes == 64 * 4
    # No general.file_type: the commonest matrix type (F32: 2 of the 4 matrices).
    assert info.quantization == "F32"


def test_synthetic_v2_and_template(tmp_path: Path) -> None:
    kvs = _llm(**{"tokenizer.chat_template": "{{ messages }}", "general.file_type": 7,
                  "tokenizer.ggml.add_bos_token": False, "ARCH.rope.freq_base": 10000.0})
    info = read_model_info(_write(tmp_path, _gguf(kvs, _TENSORS, version=2)))
    assert info.chat_template == "{{ messages }}"
    assert info.quantization == "Q8_0"
    assert info.add_bos_token is False
    assert info.rope_freq_base == 10000.0


def test_mistral_style_window_slides_everywhere(tmp_path: Path) -> None:
    kvs = _llm(**{"ARCH.attention.sliding_window": 128, "ARCH.attention.head_count_kv": 2})
    info = read_model_info(_write(tmp_path, _gguf(kvs, _TENSORS)))
    assert info.sliding_window_layers == [0, 1, 2, 3]
    assert info.kv_bytes(1000) == 4 * 2 * 16 * 2 * 2 * 128


def test_gemma2_alternates(tmp_path: Path) -> None:
    kvs = _llm("gemma2", 6, **{"ARCH.attention.sliding_window": 4096})
    info = read_model_info(_write(tmp_path, _gguf(kvs, _TENSORS)))
    assert info.sliding_window_layers == [0, 2, 4]


def test_explicit_window_pattern(tmp_path: Path) -> None:
    as_int = _llm("gemma3", 8, **{"ARCH.attention.sliding_window": 512,
                                  "ARCH.attention.sliding_window_pattern": 4})
    info = read_model_info(_write(tmp_path, _gguf(as_int, _TENSORS), "a.gguf"))
    assert info.sliding_window_layers == [0, 1, 2, 4, 5, 6]
    as_bools = _llm("newarch", 4, **{"ARCH.attention.sliding_window": 512,
                                     "ARCH.attention.sliding_window_pattern": [True, False, False, True]})
    info = read_model_info(_write(tmp_path, _gguf(as_bools, _TENSORS), "b.gguf"))
    assert info.sliding_window_layers == [0, 3]


def test_per_layer_kv_heads_take_max(tmp_path: Path) -> None:
    kvs = _llm(**{"ARCH.attention.head_count_kv": [1, 2, 0, 2]})
    info = read_model_info(_write(tmp_path, _gguf(kvs, _TENSORS)))
    assert info.n_kv_heads == 2


def test_large_arrays_become_placeholders(tmp_path: Path) -> None:
    tokens = [f"t{i}" for i in range(5000)]
    kvs = _llm(**{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.5] * 5000,
                  "tokenizer.ggml.eos_token_id": 4321, "small": [1, 2, 3]})
    path = _write(tmp_path, _gguf(kvs, _TENSORS))
    g = read_gguf(path, want_tokens=[7, "tokenizer.ggml.eos_token_id", 99999])
    assert isinstance(g.metadata["tokenizer.ggml.tokens"], ArrayInfo)
    assert g.metadata["tokenizer.ggml.scores"].length == 5000
    assert g.metadata["small"] == [1, 2, 3]
    assert g.token_strings == {7: "t7", 4321: "t4321"}
    info = read_model_info(path)
    assert info.vocab_size == 5000 and info.eos_token == "t4321"


def test_bad_version(tmp_path: Path) -> None:
    with pytest.raises(BadModelFile, match="version 1"):
        read_model_info(_write(tmp_path, _gguf(_llm(), _TENSORS, version=1)))


def test_big_endian(tmp_path: Path) -> None:
    data = bytearray(_gguf(_llm(), _TENSORS))
    data[4:8] = struct.pack(">I", 3)
    with pytest.raises(BadModelFile, match="big-endian"):
        read_model_info(_write(tmp_path, bytes(data)))


def test_huge_string_length(tmp_path: Path) -> None:
    data = _gguf(_llm(**{"general.name": "NAMEVALUE"}), _TENSORS)
    i = data.index(b"NAMEVALUE") - 8
    data = data[:i] + struct.pack("<Q", 1 << 60) + data[i + 8 :]
    with pytest.raises(BadModelFile, match="past end of file") as e:
        read_model_info(_write(tmp_path, data))
    assert "m.gguf" in str(e.value)


def test_huge_string_length_inside_vocabulary(tmp_path: Path) -> None:
    kvs = _llm(**{"tokenizer.ggml.tokens": [f"tok{i:04}" for i in range(500)]})
    data = _gguf(kvs, _TENSORS)
    i = data.index(b"tok0300") - 8
    data = data[:i] + struct.pack("<Q", 1 << 50) + data[i + 8 :]
    with pytest.raises(BadModelFile, match="past the end"):
        read_model_info(_write(tmp_path, data))


def test_absurd_counts(tmp_path: Path) -> None:
    data = bytearray(_gguf(_llm(), _TENSORS))
    data[16:24] = struct.pack("<Q", 1 << 40)  # key/value count
    with pytest.raises(BadModelFile, match="cannot fit"):
        read_model_info(_write(tmp_path, bytes(data)))


def test_tensor_past_end(tmp_path: Path) -> None:
    data = _gguf(_llm(n_layers=2), _TENSORS, data_bytes=100)
    with pytest.raises(BadModelFile, match="truncated"):
        read_model_info(_write(tmp_path, data))


def test_unknown_tensor_type(tmp_path: Path) -> None:
    data = _gguf(_llm(n_layers=2), [("blk.0.x.weight", (32,), 0)])
    i = data.index(b"blk.0.x.weight") + len("blk.0.x.weight") + 4 + 8
    data = data[:i] + struct.pack("<I", 77) + data[i + 4 :]
    with pytest.raises(BadModelFile, match="tensor type 77"):
        read_model_info(_write(tmp_path, data))


def test_missing_required_key(tmp_path: Path) -> None:
    kvs = _llm()
    del kvs["llama.block_count"]
    with pytest.raises(BadModelFile, match="block_count"):
        read_model_info(_write(tmp_path, _gguf(kvs, _TENSORS)))


def test_tensor_nbytes() -> None:
    assert tensor_nbytes(0, (10, 3)) == 120  # F32
    assert tensor_nbytes(30, (8,)) == 16  # BF16
    assert tensor_nbytes(12, (512, 2)) == 4 * 144  # Q4_K: 256 per block
    assert tensor_nbytes(8, (64,)) == 2 * 34  # Q8_0
    with pytest.raises(ValueError):
        tensor_nbytes(8, (33,))
