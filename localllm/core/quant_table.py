"""GGUF quants, best first, with their bits per weight: the one table for ranking quants and sizing models.

The fit planner ranks quants with it and estimates the size of quants it has
not seen; the models screen sizes catalog models before they are downloaded.
"""

from __future__ import annotations

# Best first. Bits per weight are typical whole-file figures for 7-8B models (llama.cpp's quantize table).
QUANT_BITS: dict[str, float] = {
    "BF16": 16.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_0": 5.5,
    "Q4_K_M": 4.89, "Q4_K_S": 4.58, "IQ4_XS": 4.25, "IQ4_NL": 4.5, "Q4_0": 4.55,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "IQ3_M": 3.66, "Q3_K_S": 3.5, "IQ3_XS": 3.3, "IQ3_XXS": 3.06,
    "Q2_K": 3.0, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06,
}
AUTO_BEST = "Q8_0"  # automatic choices stop here: 16-bit files double the memory for no visible gain
SUGGESTED = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")  # alternatives worth naming
UNKNOWN_QUANT_BITS = 5.0  # a size estimate for a quant the table lacks (Q4_1, Q5_1, ...)


def rank(quant: str) -> int:
    """Position in the table (0 is best); unknown quants sort last."""
    order = list(QUANT_BITS)
    return order.index(quant.upper()) if quant.upper() in QUANT_BITS else len(order)


def estimated_bytes(parameters: int, quant: str) -> int:
    """A GGUF's size from its parameter count and quant, before it is downloaded."""
    return int(parameters * QUANT_BITS.get(quant.upper(), UNKNOWN_QUANT_BITS) / 8)
