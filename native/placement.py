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

import torch
from torch import nn

from localllm.core.weight_formats import QUANTIZED_FORMATS

from .tensor_source import TensorSource


class Placer:
    """Puts a source's tensors into modules. `weights` is a concrete format (not "auto"); None or a
    float format stores linear weights as `dtype` parameters."""

    def __init__(self, source: TensorSource, dtype: torch.dtype, device: torch.device, weights: str | None,
                 *, dequantized: bool = False) -> None:
        """`dequantized`: quantize as `weights` says, then store the values dequantized as `dtype` parameters
        (a float model of the very same quantized values: the reference the kernels are checked against)."""
        self.source = source
        self.dtype = dtype
        self.device = torch.device(device)
        self.weights = weights
        self.quantized = weights in QUANTIZED_FORMATS
        self.dequantized = dequantized and self.quantized

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
        if self.dequantized:
            self.dequantized_parameter(module, "weight", self.quant_values(weights))
        elif self.quantized:
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
        return parts[0] if len(parts) == 1 else concat_rows(parts)

    def dequantized_parameter(self, module: nn.Module, attr: str, values) -> None:
        from .quant import dequantize

        w = dequantize(values).to(device=self.device, dtype=self.dtype)
        setattr(module, attr, nn.Parameter(w, requires_grad=False))

    def quant_weight(self, names: list[str]):
        from .quant import QuantWeight

        return QuantWeight.pack(self.quant_values(names), self.device)

    def _quant_values_of(self, name: str):
        """The file's own blocks where they convert exactly, else its dequantized slices requantized."""
        from .quant import from_gguf_blocks, take_rows

        raw = self.source.raw(name)
        if raw is not None:
            values = from_gguf_blocks(raw, self.source.type_name(name), self.source.shape(name), self.weights)
            self.source.release(name)
            if values is not None:
                order = self.source.row_order(name)
                return values if order is None else take_rows(values, order)
        return self._requantized(name)

    def _requantized(self, name: str):
        """Requantized a slice at a time into one set of rows allocated once: never the whole tensor in float."""
        from .quant import QuantValues, from_float

        total = self.source.shape(name)[0]
        out = None
        for r0, rows in self.source.slices(name):
            part = from_float(rows.float(), self.weights)
            if out is None:
                def empty(t: torch.Tensor | None) -> torch.Tensor | None:
                    return None if t is None else torch.empty((total, *t.shape[1:]), dtype=t.dtype)

                out = QuantValues(part.fmt, empty(part.q), empty(part.scales), empty(part.zeros), part.group)
            r1 = r0 + part.q.shape[0]
            out.q[r0:r1] = part.q
            out.scales[r0:r1] = part.scales
            if part.zeros is not None:
                out.zeros[r0:r1] = part.zeros
        return out
