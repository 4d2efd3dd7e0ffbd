"""Quantized weights: int4 (GGUF 4-bit blocks kept exactly), int8 and fp8, with torch's kernels.

values.py      QuantValues (device-independent), dequantize (the reference), concat_rows, take_rows
gguf_blocks.py GGUF Q4_0/Q4_1/Q4_K -> int4 without requantizing (Q8_0 -> grouped int8 for tables)
requantize.py  float -> int4 (asymmetric, groups of 32) / int8 / fp8 (per output row)
layouts.py     the kernels' layouts and which devices run them (pure, tested on CPU)
weight.py      QuantWeight: packed for one device's matmul kernel
embedding.py   QuantEmbedding: row gather from a quantized table
"""

from .embedding import QuantEmbedding
from .gguf_blocks import from_gguf_blocks
from .requantize import from_float
from .values import FORMATS, GROUP, QuantValues, concat_rows, dequantize, take_rows
from .weight import QuantWeight

__all__ = [
    "FORMATS",
    "GROUP",
    "QuantEmbedding",
    "QuantValues",
    "QuantWeight",
    "concat_rows",
    "dequantize",
    "from_float",
    "from_gguf_blocks",
    "take_rows",
]
