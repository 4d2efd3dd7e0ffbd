"""Quantized linear weights packed for one device's kernel: x @ W.T.

`QuantWeight.pack(values, device)` picks the kernel:
  int4  CPU: `_weight_int4pack_mm_for_cpu` (bfloat16 activations: the fast
        path on this kind of CPU); CUDA (capability 8.0+): `_weight_int4pack_mm`
        on the tiled layout. Rows are padded to a multiple of 16.
  int8  `_weight_int8pack_mm` (one scale per row). On the CPU its bfloat16
        path is wrong when K is not a multiple of 16, so such K are padded
        with zero columns (and x with zeros).
  fp8   `torch._scaled_mm`, activations quantized per row on the fly; refused
        in one line on CUDA below capability 8.9.
Where a kernel is missing (an older GPU, a torch build without it; checked
once per device and format on a small case against `dequantize`), the weight
falls back to a dequantized bfloat16 matrix: correct, and still half of
float32, but not smaller than bfloat16.

Activations go to the kernel as bfloat16 (x is cast if needed) and the output
comes back in x's dtype. The kernels take scales in bfloat16, so their results
differ from `x @ dequantize(v).T` by bfloat16 rounding (relative ~1e-2 at most).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from localllm.core.errors import BadRequest

from .layouts import (
    CPU_INT4_ROW_BLOCK,
    INT4_CUDA_MIN_CAPABILITY,
    INT4_ROW_MULTIPLE,
    capability_at_least,
    cuda_capability,
    cuda_inner_k_tiles,
    cuda_int4_pairs,
    fp8_refusal,
    int4_scales_and_zeros,
    pad_rows,
    padded,
)
from .requantize import FP8_MAX
from .values import QuantValues, dequantize

ACTIVATION = torch.bfloat16
CPU_PACK_ROWS = CPU_INT4_ROW_BLOCK * 256  # rows converted at once: bounds the int32 temporary
INT8_CPU_K_MULTIPLE = 16
FP8_CUDA_MULTIPLE = 16


class QuantWeight:
    """A weight packed for one kernel; call it with x (..., K) to get (..., N) in x's dtype."""

    fmt: str
    in_features: int
    out_features: int

    @classmethod
    def pack(cls, v: QuantValues, device: torch.device | str) -> "QuantWeight":
        device = torch.device(device)
        if v.fmt == "fp8":
            refusal = fp8_refusal(device.type, cuda_capability(device))
            if refusal:
                raise BadRequest(refusal)
        if v.fmt == "int8" and v.group:
            raise ValueError("grouped int8 values are for gathered tables; requantize per row for a matmul")
        kernel = _KERNELS[v.fmt]
        if not _kernel_works(kernel, device):
            return DenseWeight(v, device)
        return kernel(v, device)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: packed values, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(T, K) activations -> (T, N), in any dtype the kernel returns."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]))
        return y.to(x.dtype).reshape(*leading, self.out_features)


class Int4Weight(QuantWeight):
    fmt = "int4"

    def __init__(self, v: QuantValues, device: torch.device) -> None:
        self.out_features, self.in_features = v.shape
        self.group = v.group
        self.device = device
        v = pad_rows(v, INT4_ROW_MULTIPLE)
        q = v.q.to(device)
        self.scales_and_zeros = int4_scales_and_zeros(v, ACTIVATION).to(device)
        if device.type == "cuda":
            tiles = cuda_inner_k_tiles(self.in_features)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(cuda_int4_pairs(q), tiles)
        else:
            self.packed = torch.cat([
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i : i + CPU_PACK_ROWS].to(torch.int32), 2)
                for i in range(0, q.shape[0], CPU_PACK_ROWS)
            ])

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(ACTIVATION).contiguous()
        if self.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]


class Int8Weight(QuantWeight):
    fmt = "int8"

    def __init__(self, v: QuantValues, device: torch.device) -> None:
        self.out_features, self.in_features = v.shape
        q = v.q.to(device)
        self.pad_k = 0
        if device.type == "cpu":
            self.pad_k = padded(self.in_features, INT8_CPU_K_MULTIPLE) - self.in_features
            if self.pad_k:
                q = F.pad(q, (0, self.pad_k))
        self.q = q.contiguous()
        self.scales = v.scales.to(device=device, dtype=ACTIVATION)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scales]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(ACTIVATION)
        if self.pad_k:
            x = F.pad(x, (0, self.pad_k))
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scales)


class Fp8Weight(QuantWeight):
    fmt = "fp8"

    def __init__(self, v: QuantValues, device: torch.device) -> None:
        self.out_features, self.in_features = v.shape
        multiple = FP8_CUDA_MULTIPLE if device.type == "cuda" else 1
        self.pad_k = padded(self.in_features, multiple) - self.in_features
        v = pad_rows(v, multiple)
        q = v.q.to(device)
        if self.pad_k:
            q = F.pad(q.view(torch.uint8), (0, self.pad_k)).view(torch.float8_e4m3fn)  # 0x00 is +0.0
        self.q = q.contiguous()
        self.scales = v.scales.to(device=device, dtype=torch.float32).view(1, -1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scales]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.pad_k:
            x = F.pad(x, (0, self.pad_k))
        x_scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
        x_q = (x / x_scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x_q, self.q.t(), scale_a=x_scale, scale_b=self.scales, out_dtype=ACTIVATION)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]


class DenseWeight(QuantWeight):
    """The fallback where no kernel runs the format: the dequantized weight in bfloat16."""

    def __init__(self, v: QuantValues, device: torch.device) -> None:
        self.fmt = v.fmt
        self.out_features, self.in_features = v.shape
        self.weight = dequantize(v).to(device=device, dtype=ACTIVATION)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(ACTIVATION), self.weight)


_KERNELS: dict[str, type[QuantWeight]] = {"int4": Int4Weight, "int8": Int8Weight, "fp8": Fp8Weight}


@functools.lru_cache(maxsize=None)
def _kernel_works(kernel: type, device: torch.device) -> bool:
    """Whether this torch build runs `kernel` on `device` and agrees with `dequantize`, on a small case."""
    if kernel is Int4Weight and device.type == "cuda" and not capability_at_least(
        cuda_capability(device), INT4_CUDA_MIN_CAPABILITY
    ):
        return False
    from .requantize import from_float  # a probe only

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=gen)
    x = torch.randn(3, 128, generator=gen).to(ACTIVATION)
    v = from_float(w, kernel.fmt)
    try:
        y = kernel(v, device)(x.to(device)).float().cpu()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    expected = x.float() @ dequantize(v).T
    return bool(((y - expected).norm() / expected.norm()) < 0.05)
