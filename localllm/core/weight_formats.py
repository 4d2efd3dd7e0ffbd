"""The native engine's weight formats: how its linear weights are stored, and so what it computes in.

`auto` is decided by the engine for the device and the file; float32 and bfloat16 compute in
themselves; int8, int4 and fp8 compute in bfloat16. Plain names, so front ends and the planner
can name them without importing torch.
"""

WEIGHT_FORMATS = ("auto", "float32", "bfloat16", "int8", "int4", "fp8")
QUANTIZED_FORMATS = ("int8", "int4", "fp8")
