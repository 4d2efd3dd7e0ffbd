"""Tensors of one model file, read a slice of rows at a time.

A source presents a file's tensors under transformers' names and in
transformers' conventions, but never holds them: `read_into` dequantizes a
few MB of rows, converts them to the destination's dtype, copies them into
the destination (which may be a slice of a fused matrix, on any device) and
drops them before the next slice. So loading needs the weights that stay
resident plus a small working buffer (`core.weight_formats.LOAD_WORKING_BYTES`, 8 slices), never a whole
float32 copy of a tensor: the starter's tied embedding table alone is 671 MB
in float32.

GGUF conventions undone per slice:
- llama.cpp permutes Llama's Q and K rows within each head for its
  interleaved rotary layout; slices are whole heads, each un-permuted;
- Gemma norm weights are stored as 1 + w (HF stores w), so 1 is taken off.

A GGUF file is read through one private memory map; the pages a slice read
are handed back to the kernel (madvise) once the slice is placed, so the
mapped file does not pile up in the process's resident memory either.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from localllm.core.errors import BadModelFile

from .gguf_dequant import DEQUANTIZERS, dequantize

SLICE_BYTES = 4 << 20  # float32 bytes of one dequantized slice
# What loading needs on the host beyond the resident weights: a slice in float32,
# the dequantizers' temporaries (about three slices for the K-quants) and the
# slice in the destination dtype, with room to spare. tests/test_native_loader.py
# measures a whole load against it.
_FOLIO_LOOKBACK = 4 << 20  # see GGUFSource._drop_pages


class TensorSource:
    """The tensors of a model under HF names. Subclasses read one kind of file."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def type_name(self, name: str) -> str:
        """The stored type: a ggml type name for GGUF ("Q8_0", "F32", ...), a safetensors dtype ("BF16") otherwise."""
        raise NotImplementedError

    def raw(self, name: str) -> torch.Tensor | None:
        """The tensor's GGUF bytes (uint8, 1-D, zero-copy), in the file's row order; None for other files."""
        return None

    def row_order(self, name: str) -> torch.Tensor | None:
        """Indices that put raw()'s rows in HF order (Llama's Q and K in a GGUF); None when they already are."""
        return None

    def slices(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) pairs covering the tensor in HF order, a few MB each: float32 from a GGUF,
        the stored float dtype from safetensors. A slice is valid until the next one is asked for."""
        raise NotImplementedError

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (shape(name), any dtype and device) with the tensor, a slice of rows at a time."""
        shape = self.shape(name)
        if tuple(out.shape) != shape:
            raise ValueError(f"{name}: destination {tuple(out.shape)} for a tensor of {shape}")
        for r0, rows in self.slices(name):
            _copy_slice(out[r0 : r0 + rows.shape[0]], rows)

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        out = torch.empty(self.shape(name), dtype=dtype, device=device)
        self.read_into(name, out)
        return out

    def release(self, name: str) -> None:
        """The caller is done with raw(name): its pages may leave memory."""

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in float32 on the CPU, one at a time (references and file conversions, not the engine)."""
        for name in self.names():
            yield name, self.read(name, torch.float32)

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def close(self) -> None:
        """Let go of the file (mapped memory, handles)."""


def slice_rows(shape: tuple[int, ...], *, unit: int = 1, bytes_per_value: int = 4) -> int:
    """Rows per slice: about SLICE_BYTES, a multiple of `unit` rows (whole heads), at least one unit."""
    per_row = bytes_per_value
    for dim in shape[1:]:
        per_row *= dim
    return max(unit, SLICE_BYTES // per_row // unit * unit)


def unpermute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, (pairs, 2) -> (2, pairs). `t` holds whole heads."""
    rows, rest = t.shape[0], t.shape[1:]
    return t.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _copy_slice(out: torch.Tensor, values: torch.Tensor) -> None:
    """Convert on the host first when the destination is elsewhere: half the bytes cross the bus."""
    if out.device != values.device:
        values = values.to(out.dtype)
    out.copy_(values)


class GGUFSource(TensorSource):
    """A GGUF file through a memory map. `tensors` maps each HF name to its GGUF TensorInfo."""

    def __init__(self, path: Path, tensors: dict, *, qk_heads: dict[str, int] | None = None,
                 norm_offset: float = 0.0) -> None:
        """`qk_heads`: HF names of llama.cpp-permuted tensors -> their head count; `norm_offset` is taken off
        every `*norm.weight` (Gemma's 1)."""
        self.path = Path(path)
        self._infos = tensors
        self._qk_heads = qk_heads or {}
        self._norm_offset = norm_offset
        self._handle = open(self.path, "rb")
        # ACCESS_COPY (private, writable) so torch can view the bytes without a copy or a warning; nothing writes.
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def _info(self, name: str):
        info = self._infos.get(name)
        if info is None:
            raise BadModelFile(f"the model file lacks the tensor {name}")
        return info

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self._info(name).shape))  # ggml lists the fastest dimension first

    def type_name(self, name: str) -> str:
        return self._info(name).type_name

    def raw(self, name: str) -> torch.Tensor:
        info = self._info(name)
        return torch.from_numpy(self._bytes[info.offset : info.offset + info.n_bytes])

    def row_order(self, name: str) -> torch.Tensor | None:
        heads = self._qk_heads.get(name)
        if heads is None:
            return None
        rows = self.shape(name)[0]
        return unpermute_rows(torch.arange(rows), heads)

    def release(self, name: str) -> None:
        info = self._info(name)
        self._drop_pages(info.offset, info.n_bytes)

    def slices(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        info = self._info(name)
        shape = self.shape(name)
        if info.type_name not in DEQUANTIZERS:
            dequantize(self.raw(name), info.type_name, shape, name=name)  # words the error
        per_block, block_bytes, _ = DEQUANTIZERS[info.type_name]
        heads = self._qk_heads.get(name)
        row_values = 1
        for dim in shape[1:]:
            row_values *= dim
        if len(shape) == 1 or row_values % per_block:  # a vector (norms, biases): small, in one go
            yield 0, self._values(name, info.offset, info.n_bytes, shape, heads)
            self._drop_pages(info.offset, info.n_bytes)
            return
        row_bytes = row_values // per_block * block_bytes
        unit = shape[0] // heads if heads else 1
        step = slice_rows(shape, unit=unit)
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            offset, n_bytes = info.offset + r0 * row_bytes, (r1 - r0) * row_bytes
            yield r0, self._values(name, offset, n_bytes, (r1 - r0, *shape[1:]), (r1 - r0) // unit if heads else None)
            self._drop_pages(offset, n_bytes)
        self._drop_pages(info.offset, info.n_bytes)

    def _values(self, name: str, offset: int, n_bytes: int, shape: tuple[int, ...], heads: int | None) -> torch.Tensor:
        raw = torch.from_numpy(self._bytes[offset : offset + n_bytes])
        values = dequantize(raw, self.type_name(name), shape, name=name)
        if heads:
            values = unpermute_rows(values, heads)
        if self._norm_offset and name.endswith("norm.weight"):
            values = values - self._norm_offset
        return values

    def _drop_pages(self, offset: int, n_bytes: int) -> None:
        """Hand the file's pages back: the kernel rereads them if they are needed again.

        A fault maps a whole folio of the page cache (up to 2 MB, aligned), so the pages just
        before `offset`, dropped with the previous slice, may be mapped again: they go too.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = max(0, offset - _FOLIO_LOOKBACK)
        start -= start % mmap.PAGESIZE
        end = min(len(self._map), offset + n_bytes + _FOLIO_LOOKBACK)
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._bytes = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a raw() view; the map goes with it
            pass
        self._handle.close()


_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsSource(TensorSource):
    """The *.safetensors files of a Hugging Face folder, through safetensors' own slices.

    `names` maps each HF name to (file, its name in that file).
    """

    def __init__(self, names: dict[str, tuple[Path, str]]) -> None:
        from safetensors import safe_open

        self._where = names
        self._handles = {}
        for file in sorted({f for f, _ in names.values()}):
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (OSError, ValueError, RuntimeError) as exc:
                raise BadModelFile(f"{file.name} could not be read ({exc})") from None

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise BadModelFile(f"the model file lacks the tensor {name}")
        file, stored = self._where[name]
        return self._handles[file].get_slice(stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def type_name(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def slices(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        part = self._slice(name)
        stored = part.get_dtype()
        if stored not in _SAFETENSORS_FLOATS:
            raise BadModelFile(f"tensor {name} is {stored}; the native engine reads F32, F16 and BF16 safetensors")
        shape = tuple(part.get_shape())
        if len(shape) <= 1:
            yield 0, part[:]
            return
        step = slice_rows(shape)
        for r0 in range(0, shape[0], step):
            yield r0, part[r0 : min(shape[0], r0 + step)]

    def close(self) -> None:
        self._handles.clear()


class MemorySource(TensorSource):
    """Tensors already in memory (a model built in-process). Each is given up once read."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise BadModelFile(f"the model file lacks the tensor {name}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def type_name(self, name: str) -> str:
        return str(self._get(name).dtype).removeprefix("torch.").upper()

    def slices(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, self._get(name)
        self._tensors.pop(name, None)

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor itself when it is already in `dtype` on `device` (no copy), else a converted copy."""
        self._get(name)  # words a missing tensor
        return self._tensors.pop(name).to(device=device, dtype=dtype)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in list(self._tensors.items()):
            yield name, t.float()
