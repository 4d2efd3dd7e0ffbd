"""GGUF dequantization in torch against the `gguf` package's reference dequantizers: bit for bit."""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import numpy as np
import pytest
import torch

from localllm.core.errors import BadModelFile
from localllm.core.gguf_reader import read_gguf
from native.gguf_dequant import DEQUANTIZERS, dequantize

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def reference(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    qtype = GGMLQuantizationType[type_name]
    _, block_bytes, _ = DEQUANTIZERS[type_name]
    values = gguf_quants.dequantize(raw.reshape(-1, block_bytes), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def test_every_tensor_type_of_the_starter_is_bit_identical(starter_gguf):
    g = read_gguf(starter_gguf)
    data = np.memmap(starter_gguf, dtype=np.uint8, mode="r")
    seen = {}
    for t in g.tensors:
        if t.type_name not in seen and t.name != "token_embd.weight":
            seen[t.type_name] = t
    assert set(seen) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    for t in seen.values():
        raw = np.array(data[t.offset : t.offset + t.n_bytes])
        shape = tuple(reversed(t.shape))
        got = dequantize(torch.from_numpy(raw), t.type_name, shape, name=t.name)
        assert torch.equal(got, reference(raw, t.type_name, shape)), t.type_name


def test_every_tensor_type_of_smollm2_is_bit_identical(smollm2_gguf):
    """The default chat model is mostly Q4_1 (its embedding table Q8_0, its norms F32)."""
    g = read_gguf(smollm2_gguf)
    data = np.memmap(smollm2_gguf, dtype=np.uint8, mode="r")
    seen = {}
    for t in g.tensors:
        seen.setdefault(t.type_name, t)
    assert set(seen) == {"F32", "Q4_1", "Q8_0"}
    for t in seen.values():
        raw = np.array(data[t.offset : t.offset + t.n_bytes])
        shape = tuple(reversed(t.shape))
        got = dequantize(torch.from_numpy(raw), t.type_name, shape, name=t.name)
        assert torch.equal(got, reference(raw, t.type_name, shape)), t.type_name


def _random_blocks(type_name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random block bytes whose half-precision scale fields hold sane values (random bits may be NaN)."""
    rng = np.random.default_rng(seed)
    per_block, block_bytes, _ = DEQUANTIZERS[type_name]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    halves = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for offset in halves.get(type_name, []):
        scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    if type_name == "F16":
        blocks = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if type_name == "BF16":
        f32 = rng.standard_normal(n_blocks).astype(np.float32)
        blocks = (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    if type_name == "F32":
        blocks = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    return blocks


@pytest.mark.parametrize("type_name", sorted(DEQUANTIZERS))
def test_random_blocks_of_every_supported_type_are_bit_identical(type_name):
    per_block, _, _ = DEQUANTIZERS[type_name]
    n_blocks = 64 if per_block > 1 else 4096
    raw = _random_blocks(type_name, n_blocks)
    shape = (8, n_blocks * per_block // 8)
    got = dequantize(torch.from_numpy(raw.reshape(-1)), type_name, shape, name="t")
    assert torch.equal(got, reference(raw.reshape(-1), type_name, shape))


def test_unsupported_types_and_truncated_data_are_bad_model_files():
    with pytest.raises(BadModelFile, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,), name="blk.0.attn_q.weight")
    with pytest.raises(BadModelFile, match="do not hold"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,), name="t")
