"""Quantized weights (native/quant): GGUF 4-bit blocks kept exactly, requantization bounds,
and torch's int4/int8/fp8 kernels on the CPU against `dequantize`, the float reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from native import gguf_dequant
from native.layers.linear import Embedding, Linear
from native.quant import (
    QuantEmbedding,
    QuantValues,
    QuantWeight,
    concat_rows,
    dequantize,
    from_float,
    from_gguf_blocks,
    take_rows,
)
from native.quant import layouts, weight
from native.quant.requantize import FP8_MAX

CPU = torch.device("cpu")
KERNEL_TOLERANCE = 1e-2  # relative output error: bfloat16 activations, scales and output


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return float((y.float() - expected).norm() / expected.norm())


def f16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).view(torch.uint8).reshape(values.shape[0], 2)


def random_blocks(type_name: str, n_blocks: int, g: torch.Generator) -> torch.Tensor:
    """Valid GGUF blocks: random quants and scale bytes, finite f16 scales."""
    _, block_bytes, _ = gguf_dequant.DEQUANTIZERS[type_name]
    blocks = torch.randint(0, 256, (n_blocks, block_bytes), dtype=torch.uint8, generator=g)
    blocks[:, 0:2] = f16_bytes(torch.rand(n_blocks, generator=g) * 0.02 + 1e-4)
    if type_name in ("Q4_1", "Q4_K"):  # m / dmin
        blocks[:, 2:4] = f16_bytes(torch.randn(n_blocks, generator=g) * 0.02)
    return blocks.reshape(-1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_4bit_gguf_blocks_are_kept_exactly(type_name: str) -> None:
    n, k = 48, 512
    per_block = gguf_dequant.DEQUANTIZERS[type_name][0]
    raw = random_blocks(type_name, n * k // per_block, gen(1))
    v = from_gguf_blocks(raw, type_name, (n, k), "int4")
    assert v is not None and v.fmt == "int4" and v.group == 32
    assert v.q.dtype == torch.uint8 and int(v.q.max()) <= 15
    expected = gguf_dequant.dequantize(raw, type_name, (n, k))
    # only the scales and zeros are recomputed: float32 rounding of (q - 8) * s + z against q * s - m
    torch.testing.assert_close(dequantize(v), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_starter_tensors_are_kept_exactly(starter_gguf: Path) -> None:
    from localllm.core.gguf_reader import read_gguf

    gguf = read_gguf(starter_gguf)
    data = np.memmap(starter_gguf, dtype=np.uint8, mode="r")
    q4k = [t for t in gguf.tensors if t.type_name == "Q4_K"][:2]
    embd = next(t for t in gguf.tensors if t.name == "token_embd.weight")
    assert q4k and embd.type_name == "Q8_0"
    for info in q4k:
        shape = (info.shape[1], info.shape[0])
        raw = torch.from_numpy(np.array(data[info.offset : info.offset + info.n_bytes]))
        v = from_gguf_blocks(raw, "Q4_K", shape, "int4")
        assert v is not None
        expected = gguf_dequant.dequantize(raw, "Q4_K", shape)
        torch.testing.assert_close(dequantize(v), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    rows, dim = 1024, embd.shape[0]  # the first rows of the tied table, kept as grouped int8
    nbytes = rows * dim // 32 * 34
    raw = torch.from_numpy(np.array(data[embd.offset : embd.offset + nbytes]))
    v = from_gguf_blocks(raw, "Q8_0", (rows, dim), "int8", keep_groups=True)
    assert v is not None and v.group == 32
    assert torch.equal(dequantize(v), gguf_dequant.dequantize(raw, "Q8_0", (rows, dim)))
    table = QuantEmbedding.from_values(v, CPU)
    ids = torch.tensor([0, 5, 1023, 5])
    assert torch.equal(table(ids, torch.float32), dequantize(v)[ids])


def test_types_that_cannot_be_kept_return_none() -> None:
    raw = torch.zeros(8 * 64 // 32 * 34, dtype=torch.uint8)
    assert from_gguf_blocks(raw, "Q8_0", (8, 64), "int8") is None  # one scale per row in the int8 kernel
    assert from_gguf_blocks(raw, "Q8_0", (8, 64), "int4") is None
    assert from_gguf_blocks(torch.zeros(8 * 64 // 32 * 22, dtype=torch.uint8), "Q5_0", (8, 64), "int4") is None
    assert from_gguf_blocks(torch.zeros(8 * 256 // 256 * 210, dtype=torch.uint8), "Q6_K", (8, 256), "int4") is None
    assert from_gguf_blocks(torch.zeros(8 * 64 * 2, dtype=torch.uint8), "F16", (8, 64), "int4") is None
    q4k = random_blocks("Q4_K", 8, gen())
    assert from_gguf_blocks(q4k, "Q4_K", (8, 256), "int8") is None
    assert from_gguf_blocks(q4k, "Q4_K", (8, 256), "fp8") is None
    with pytest.raises(ValueError, match="do not hold"):
        from_gguf_blocks(q4k[:-1], "Q4_K", (8, 256), "int4")


def test_requantization_stays_within_half_a_step() -> None:
    w = torch.randn(64, 256, generator=gen(2)) * torch.rand(64, 1, generator=gen(3)) * 3
    w[5] = 0.0  # an all-zero row
    w[6, :32] = 0.25  # a constant group
    v = from_float(w, "int4")
    error = (w - dequantize(v)).abs().view(64, 8, 32).amax(-1)
    assert bool((error <= v.scales / 2 + 1e-6).all())
    assert float(error[5].max()) == 0.0 and float(error[6, 0]) == 0.0

    v = from_float(w, "int8")
    assert v.q.dtype == torch.int8 and v.scales.shape == (64,)
    assert bool(((w - dequantize(v)).abs().amax(-1) <= v.scales / 2 + 1e-6).all())

    v = from_float(w, "fp8")
    assert v.q.dtype == torch.float8_e4m3fn
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value (2^-10 of the scale below normals)
    bound = w.abs() / 16 + v.scales.unsqueeze(-1) * 2.0**-10 + 1e-7
    assert bool(((w - dequantize(v)).abs() <= bound).all())
    assert float(dequantize(v).abs().amax()) <= float(w.abs().amax()) * (1 + 1e-6)


def test_requantization_works_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    from native.quant import requantize

    w = torch.randn(100, 64, generator=gen(4))
    whole = from_float(w, "int4")
    monkeypatch.setattr(requantize, "SLICE_VALUES", 7 * 64)
    sliced = from_float(w, "int4")
    assert torch.equal(whole.q, sliced.q) and torch.equal(whole.scales, sliced.scales)
    with pytest.raises(ValueError, match="divisible by 32"):
        from_float(torch.randn(4, 48), "int4")


def test_concat_rows_and_take_rows() -> None:
    a, b = torch.randn(16, 64, generator=gen(5)), torch.randn(32, 64, generator=gen(6))
    for fmt in ("int4", "int8", "fp8"):
        fused = concat_rows([from_float(a, fmt), from_float(b, fmt)])
        assert torch.equal(dequantize(fused), dequantize(from_float(torch.cat((a, b)), fmt)))
        order = torch.randperm(48, generator=gen(7))
        assert torch.equal(dequantize(take_rows(fused, order)), dequantize(fused)[order])
    with pytest.raises(ValueError, match="cannot stack"):
        concat_rows([from_float(a, "int4"), from_float(b, "int8")])
    with pytest.raises(ValueError, match="cannot stack"):
        concat_rows([from_float(a, "int8"), from_float(torch.randn(4, 32), "int8")])


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("rows", [1, 8])
def test_quant_weight_matches_the_dequantized_reference(fmt: str, rows: int) -> None:
    w = torch.randn(160, 640, generator=gen(8)) * 0.05
    v = from_float(w, fmt)
    qw = QuantWeight.pack(v, CPU)
    assert type(qw) is not weight.DenseWeight  # the real kernel runs on this CPU
    assert (qw.in_features, qw.out_features) == (640, 160)
    x = torch.randn(rows, 640, generator=gen(9)).to(torch.bfloat16)
    y = qw(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 160)
    if fmt == "fp8":  # activations are quantized per row too: compare with the same rounding
        scale = x.float().abs().amax(-1, keepdim=True) / FP8_MAX
        x_ref = (x.float() / scale).to(torch.float8_e4m3fn).float() * scale
        assert relative_error(y, x.float() @ dequantize(v).T) < 5e-2
    else:
        x_ref = x.float()
    assert relative_error(y, x_ref @ dequantize(v).T) < KERNEL_TOLERANCE
    y32 = qw(x.float().view(rows, 1, 640))  # other dtypes and leading dims come back as given
    assert y32.dtype == torch.float32 and y32.shape == (rows, 1, 160)


def test_nbytes_count_what_is_held() -> None:
    v = from_float(torch.randn(256, 640, generator=gen(10)), "int4")
    qw = QuantWeight.pack(v, CPU)
    assert qw.nbytes == 256 * 640 // 2 + 640 // 32 * 256 * 2 * 2  # nibbles + bfloat16 scale/zero pairs
    assert QuantWeight.pack(from_float(torch.randn(256, 640), "int8"), CPU).nbytes == 256 * 640 + 256 * 2
    assert QuantWeight.pack(from_float(torch.randn(256, 640), "fp8"), CPU).nbytes == 256 * 640 + 256 * 4
    table = QuantEmbedding.from_values(v, CPU)
    assert table.nbytes == 256 * 640 // 2 + 2 * 256 * 20 * 4


def test_shapes_the_kernels_refuse_are_padded() -> None:
    # the CPU int4 packer needs N % 16 == 0; the CPU int8 kernel in bfloat16 is wrong unless K % 16 == 0
    for fmt, shape in (("int4", (30, 96)), ("int8", (30, 40)), ("int8", (7, 72)), ("fp8", (30, 40))):
        v = from_float(torch.randn(*shape, generator=gen(11)), fmt)
        x = torch.randn(3, shape[1], generator=gen(12)).to(torch.bfloat16)
        y = QuantWeight.pack(v, CPU)(x)
        assert y.shape == (3, shape[0])
        tolerance = 5e-2 if fmt == "fp8" else KERNEL_TOLERANCE
        assert relative_error(y, x.float() @ dequantize(v).T) < tolerance, (fmt, shape)
    grouped = QuantValues("int8", torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), None, 32)
    with pytest.raises(ValueError, match="grouped int8"):
        QuantWeight.pack(grouped, CPU)


def test_cpu_int4_packing_in_row_slices_equals_packing_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    v = from_float(torch.randn(3 * 64 + 16, 128, generator=gen(13)), "int4")
    whole = QuantWeight.pack(v, CPU)
    monkeypatch.setattr(weight, "CPU_PACK_ROWS", 64)
    sliced = weight.Int4Weight(v, CPU)
    assert torch.equal(whole.packed, sliced.packed)


def test_fallback_is_the_dequantized_weight() -> None:
    v = from_float(torch.randn(32, 64, generator=gen(14)), "int4")
    dense = weight.DenseWeight(v, CPU)
    x = torch.randn(2, 64, generator=gen(15))
    assert dense.nbytes == 32 * 64 * 2
    assert relative_error(dense(x), x @ dequantize(v).T) < KERNEL_TOLERANCE


def test_quant_embedding_gathers_dequantized_rows() -> None:
    w = torch.randn(300, 128, generator=gen(16))
    ids = torch.tensor([[0, 299, 7], [7, 150, 1]])
    for fmt in ("int4", "int8", "fp8"):
        v = from_float(w, fmt)
        table = QuantEmbedding.from_values(v, CPU)
        assert torch.equal(table(ids, torch.float32), dequantize(v)[ids])
        assert table(ids, torch.bfloat16).dtype == torch.bfloat16
        assert table.nbytes < w.numel() * 4 / 3


def test_linear_and_embedding_drop_their_float_weight() -> None:
    layer = Linear(64, 48, bias=True)
    layer.bias = torch.nn.Parameter(torch.randn(48, generator=gen(17)), requires_grad=False)
    v = from_float(torch.randn(48, 64, generator=gen(18)), "int8")
    layer.set_quantized(QuantWeight.pack(v, CPU))
    assert layer.weight is None and [name for name, _ in layer.named_parameters()] == ["bias"]
    x = torch.randn(5, 64, generator=gen(19))
    assert relative_error(layer(x), x @ dequantize(v).T + layer.bias) < KERNEL_TOLERANCE
    with pytest.raises(ValueError, match="cannot replace"):
        Linear(64, 32).set_quantized(QuantWeight.pack(v, CPU))

    emb = Embedding(300, 128)
    v = from_float(torch.randn(300, 128, generator=gen(20)), "int4")
    emb.set_quantized(QuantEmbedding.from_values(v, CPU), torch.float32)
    assert emb.weight is None
    ids = torch.tensor([3, 299])
    assert torch.equal(emb(ids), dequantize(v)[ids])


def test_float_linear_is_unchanged() -> None:
    layer = Linear(64, 48)
    layer.weight = torch.nn.Parameter(torch.randn(48, 64, generator=gen(21)), requires_grad=False)
    x = torch.randn(4, 64, generator=gen(22))
    torch.testing.assert_close(layer(x), x @ layer.weight.T)


def test_fp8_refusal_on_gpus_before_ada() -> None:
    assert layouts.fp8_refusal("cpu", None) is None
    assert layouts.fp8_refusal("cuda", (8, 9)) is None
    assert layouts.fp8_refusal("cuda", (9, 0)) is None
    message = layouts.fp8_refusal("cuda", (8, 6))
    assert message is not None and "8.9" in message and "8.6" in message and "\n" not in message
    assert layouts.fp8_refusal("cuda", (7, 5)) is not None
    assert layouts.capability_at_least((8, 0), layouts.INT4_CUDA_MIN_CAPABILITY)
    assert not layouts.capability_at_least((7, 5), layouts.INT4_CUDA_MIN_CAPABILITY)


def test_cuda_int4_layout() -> None:
    q = torch.randint(0, 16, (16, 256), dtype=torch.uint8, generator=gen(23))
    pairs = layouts.cuda_int4_pairs(q)
    assert pairs.shape == (16, 128) and pairs.dtype == torch.uint8
    # CUDA's packer builds each int32 word from four pair bytes b0..b3 as
    #   b3.lo b2.lo b1.lo b0.lo b3.hi b2.hi b1.hi b0.hi   (nibbles, most significant first)
    # and documents it equal to w7 w5 w3 w1 w6 w4 w2 w0 for the eight values w0..w7 those
    # bytes hold in column order: true exactly when column 2j sits in the high nibble of byte j.
    b = pairs.view(16, 32, 4).to(torch.int64)
    w = q.view(16, 32, 8).to(torch.int64)
    from_bytes = sum(((b[..., i] & 0xF) << (16 + 4 * i)) | ((b[..., i] >> 4) << (4 * i)) for i in range(4))
    from_values = sum((w[..., 2 * i + 1] << (16 + 4 * i)) | (w[..., 2 * i] << (4 * i)) for i in range(4))
    assert torch.equal(from_bytes, from_values)
    assert [layouts.cuda_inner_k_tiles(k) for k in (640, 2048, 576, 96)] == [8, 8, 4, 2]
    with pytest.raises(ValueError, match="divisible by 32"):
        layouts.cuda_inner_k_tiles(48)

    v = from_float(torch.randn(20, 64, generator=gen(24)), "int4")
    sz = layouts.int4_scales_and_zeros(v, torch.float32)
    assert sz.shape == (2, 20, 2)
    assert torch.equal(sz[1, 3], torch.stack((v.scales[3, 1], v.zeros[3, 1])))
    padded = layouts.pad_rows(v, 16)
    assert padded.shape == (32, 64)
    assert torch.equal(dequantize(padded)[:20], dequantize(v)) and not dequantize(padded)[20:].any()
