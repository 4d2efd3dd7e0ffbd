"""Filling a model's parameters from a tensor source, one destination at a time.

Each parameter is allocated once, on its device and in its dtype, and the
source fills it a slice of rows at a time; fused matrices (q/k/v, gate/up)
are filled part by part, so no full copy of any tensor is ever made on the
way. With a quantized weight format (int8, int4, fp8) the linear weights
become QuantWeights instead (native/quant/): each source tensor keeps its
file's blocks where they convert exactly (`from_gguf_blocks`), else its
dequantized slices are requantized (`from_float`), and the parts of a fused
matrix are stacked row by row before packing.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import nn

from localllm.core.weight_formats import QUANTIZED_FORMATS

from .tensor_source import TensorSource


class Placer:
    """Puts a source's tensors into modules. `weights` is a concrete format (not "auto"); None or a
    float format stores linear weights as `dtype` parameters."""

    def __init__(self, source: TensorSource, dtype: torch.dtype, device: torch.device, weights: str | None) -> None:
        self.source = source
        self.dtype = dtype
        self.device = torch.device(device)
        self.weights = weights
        self.quantized = weights in QUANTIZED_FORMATS

    # -- float parameters ---------------------------------------------------------------
    def tensor(self, names: list[str], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensors `names` stacked by rows, in `dtype` (default: the engine's) on the device."""
        dtype = dtype or self.dtype
        if len(names) == 1:
            return self.source.read(names[0], dtype, self.device)
        shapes = [self.source.shape(n) for n in names]
        out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtype, device=self.device)
        row = 0
        for name, shape in zip(names, shapes):
            self.source.read_into(name, out[row : row + shape[0]])
            row += shape[0]
        return out

    def parameter(self, module: nn.Module, attr: str, names: list[str], dtype: torch.dtype | None = None) -> None:
        setattr(module, attr, nn.Parameter(self.tensor(names, dtype), requires_grad=False))

    def norm(self, module: nn.Module, name: str, offset: float) -> None:
        """A norm weight in float32, plus the model's offset (Gemma's 1 + w)."""
        w = self.tensor([name], torch.float32)
        setattr(module, "weight", nn.Parameter(w + offset if offset else w, requires_grad=False))

    def linear(self, module: nn.Module, prefixes: list[str]) -> None:
        """A Linear from the tensors `prefix.weight` (and `prefix.bias`), fused in the order given."""
        weights = [p + ".weight" for p in prefixes]
        if self.quantized:
            module.set_quantized(self.quant_weight(weights))
        else:
            self.parameter(module, "weight", weights)
        if getattr(module, "bias", None) is not None:
            self.parameter(module, "bias", [p + ".bias" for p in prefixes])

    # -- quantized weights --------------------------------------------------------------
    def quant_values(self, names: list[str]):
        """The QuantValues of `names` stacked by rows (HF row order)."""
        from .quant import concat_rows

        parts = [self._quant_values_of(name) for name in names]
        if len({p.group for p in parts}) > 1:  # kept blocks and requantized rows disagree: requantize all
            parts = [self._requantized(name) for name in names]
        return parts[0] if len(parts) == 1 else concat_rows(parts)

    def quant_weight(self, names: list[str]):
        from .quant import QuantWeight

        return QuantWeight.pack(self.quant_values(names), self.device)

    def _quant_values_of(self, name: str):
        from .quant import from_gguf_blocks

        raw = self.source.raw(name)
        if raw is not None:
            values = from_gguf_blocks(raw, self.source.type_name(name), self.source.shape(name), self.weights)
            self.source.release(name)
            if values is not None:
                order = self.source.row_order(name)
                return values if order is None else take_rows(values, order)
        return self._requantized(name)

    def _requantized(self, name: str):
        """Requantized from the dequantized values, a slice at a time, into one set of rows."""
        from .quant import from_float

        total = self.source.shape(name)[0]
        stacked = None
        for r0, rows in self.source.slices(name):
            part = from_float(rows.float(), self.weights)
            if stacked is None:
                stacked = _empty_rows_like(part, total)
            _put_rows(stacked, r0, part)
        return stacked


def take_rows(values, order: torch.Tensor):
    """QuantValues with their rows reordered (every per-row field; exact)."""
    return replace(values, **{f.name: getattr(values, f.name)[order] for f in fields(values)
                              if isinstance(getattr(values, f.name), torch.Tensor)})


def _row_fields(values) -> list[str]:
    return [f.name for f in fields(values) if isinstance(getattr(values, f.name), torch.Tensor)]


def _empty_rows_like(part, total: int):
    return replace(part, **{name: torch.empty((total, *getattr(part, name).shape[1:]), dtype=getattr(part, name).dtype)
                            for name in _row_fields(part)})


def _put_rows(stacked, r0: int, part) -> None:
    for name in _row_fields(part):
        src = getattr(part, name)
        getattr(stacked, name)[r0 : r0 + src.shape[0]].copy_(src)
