"""The native engine's weight formats: how its linear weights are stored, and so what it computes in.

`auto` is decided by the engine for the device and the file; float32 and bfloat16 compute in
themselves; int8, int4 and fp8 compute in bfloat16. Plain names, so front ends and the planner
can name them without importing torch.
"""

WEIGHT_FORMATS = ("auto", "float32", "bfloat16", "int8", "int4", "fp8")
QUANTIZED_FORMATS = ("int8", "int4", "fp8")
STORED_FORMATS = tuple(f for f in WEIGHT_FORMATS if f != "auto")  # what `auto` resolves to

# The streaming loader's host working buffer beside what stays resident: a few slices of rows
# being read, dequantized and converted (native/tensor_source.py reads 4 MiB slices, 8 in flight).
LOAD_WORKING_BYTES = 32 << 20
_INT4_GROUP = 32  # native/quant's int4 group: a float32 scale and zero per 32 values while loading
_RAW_BYTES_PER_VALUE = 0.625  # Q4_1, the largest 4-bit block kept as it is (mapped while converted)


def load_working_bytes(weights: str, *, table_values: int, largest_fused_values: int) -> int:
    """Host bytes a load needs beyond the weights that stay resident (the fit planner charges it).

    Float formats: LOAD_WORKING_BYTES. Quantized formats also hold the unpacked values (a byte per
    value, plus int4's scales and zeros) of the largest matrix while it is packed: the embedding or
    output table (`table_values`), or a fused q/k/v or gate/up whose parts and stack coexist.
    """
    if weights not in QUANTIZED_FORMATS:
        return LOAD_WORKING_BYTES
    per_value = 1 + (8 / _INT4_GROUP if weights == "int4" else 0)
    return LOAD_WORKING_BYTES + int(max(table_values * (per_value + _RAW_BYTES_PER_VALUE), 2 * largest_fused_values * per_value))
