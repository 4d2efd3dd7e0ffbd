"""Linear and Embedding modules that are built empty, and the CPU matrix-product choice.

torch.nn's versions initialise random weights in their constructors, which
costs seconds for a 262k-row embedding (and imports torch's compiler stack
even on the "meta" device). The loader overwrites every weight anyway, so
these start as meta tensors that take no memory.

`linear` computes x @ W.T. On the CPU, for a few rows (a decode batch), MKL is
markedly faster computing (W @ x.T).T than x @ W.T (docs/MEASUREMENTS.md). One
row and big prompt chunks take the usual way.

`PackedOutput` is for the one matrix that dominates CPU decoding, the output
projection (262,144 x 640 for the starter). oneDNN with the weight reordered
once into its blocked layout beats MKL on it at every row count measured. The
price is a second copy of that matrix when it is tied to the embedding.

`set_quantized` swaps a module's float weight for a quantized one
(native/quant): the forward then runs the quantized kernel (or gathers
quantized rows) and the float parameter is dropped, so its memory is freed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from native.quant import QuantEmbedding, QuantWeight

META = torch.device("meta")
FEW_ROWS = 128


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.device.type == "cpu" and x.dim() == 2 and 1 < x.shape[0] <= FEW_ROWS:
        out = torch.mm(weight, x.t()).t().contiguous()
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


class PackedOutput:
    """An output projection pre-reordered for oneDNN (CPU, float32); None from `pack` where unavailable."""

    def __init__(self, packed: torch.Tensor) -> None:
        self.packed = packed

    @classmethod
    def pack(cls, weight: torch.Tensor, batch_hint: int) -> "PackedOutput | None":
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = cls(torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
            probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            expected = F.linear(probe, weight)
            if not torch.allclose(packed(probe), expected, rtol=1e-4, atol=1e-3):
                return None  # a oneDNN build that disagrees: keep the plain path
            return packed
        except (AttributeError, RuntimeError):  # an op this torch build lacks
            return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def empty_parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=META), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = empty_parameter(out_features, in_features)
        self.bias = empty_parameter(out_features) if bias else None
        self.quantized: QuantWeight | None = None

    def set_quantized(self, qw: "QuantWeight") -> None:
        """Run `qw` from now on and drop the float weight (the bias, if any, stays)."""
        if (qw.out_features, qw.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"a {qw.out_features} x {qw.in_features} quantized weight cannot replace a "
                f"{self.out_features} x {self.in_features} one"
            )
        self.quantized = qw
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            y = self.quantized(x)
            return y + self.bias.to(y.dtype) if self.bias is not None else y
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.dim = dim
        self.weight = empty_parameter(num_embeddings, dim)
        self.quantized: QuantEmbedding | None = None
        self.quantized_dtype = torch.bfloat16

    def set_quantized(self, table: "QuantEmbedding", dtype: torch.dtype = torch.bfloat16) -> None:
        """Gather rows from `table` (returned in `dtype`) from now on and drop the float weight."""
        if (table.num_embeddings, table.dim) != (self.num_embeddings, self.dim):
            raise ValueError(
                f"a {table.num_embeddings} x {table.dim} quantized table cannot replace a "
                f"{self.num_embeddings} x {self.dim} one"
            )
        self.quantized = table
        self.quantized_dtype = dtype
        self.weight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(ids, self.quantized_dtype)
        return F.embedding(ids, self.weight)
