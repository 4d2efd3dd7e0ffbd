"""Embedding tables kept quantized: gather rows, dequantize only those.

A token embedding is read a handful of rows per step, so no matmul kernel is
needed: the table stays in its quantized form (int4 as two values per byte,
int8 per row or in Q8_0's groups of 32, fp8) and each call dequantizes just
the rows it gathers. The starter's 262,144 x 640 table is 671 MB in float32
and 168 MB (+ scales) as int8.
"""

from __future__ import annotations

import torch

from .values import INT4_OFFSET, QuantValues, pack_nibbles, unpack_nibbles


class QuantEmbedding:
    def __init__(self, v: QuantValues, device: torch.device | str) -> None:
        self.fmt = v.fmt
        self.group = v.group
        self.num_embeddings, self.dim = v.shape
        q = v.q.to(device)
        self.q = pack_nibbles(q).contiguous() if v.fmt == "int4" else q.contiguous()
        self.scales = v.scales.to(device=device, dtype=torch.float32)
        self.zeros = None if v.zeros is None else v.zeros.to(device=device, dtype=torch.float32)

    @classmethod
    def from_values(cls, v: QuantValues, device: torch.device | str) -> "QuantEmbedding":
        return cls(v, torch.device(device))

    @property
    def nbytes(self) -> int:
        held = [self.q, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    def __call__(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = self.q.index_select(0, flat)
        if self.fmt == "int4":
            q = unpack_nibbles(q).to(torch.float32) - INT4_OFFSET
        else:
            q = q.to(torch.float32)
        scales = self.scales.index_select(0, flat)
        if self.group:
            q = q.view(flat.numel(), self.dim // self.group, self.group) * scales.unsqueeze(-1)
            if self.zeros is not None:
                q = q + self.zeros.index_select(0, flat).unsqueeze(-1)
        else:
            q = q * scales.unsqueeze(-1)
        return q.reshape(*ids.shape, self.dim).to(dtype)
