"""Predicted decode speed: the bytes a step reads over the bandwidth the engine reaches.

A decode step reads every weight once, however many sequences it carries
(both engines batch: llama.cpp's slots go into one llama_decode, the native
engine batches continuously), plus each sequence's KV cache; each further
sequence also adds its own compute. Per device a plan runs on:

    step(n) = (W + n * KV) / (B * e) + (n - 1) * row
    row     = 2 * P / (F * c)                 on a GPU (P parameters there, F its tensor throughput)
            = r * (W + KV) / (B * e)          on the CPU (r measured: n rows cost 1 + r(n - 1) steps of one)

decode_tok_s = 1 / step(1) for one person chatting; throughput_tok_s =
n / step(n) for n parallel requests. W and KV come from the plan (its weight
format, its layers on each device; KV at half the planned context, a chat
half way through), B from bandwidth.py, and e, c and r per engine, device
and weight format from EFFICIENCY below: each says whether it was measured
(docs/MEASUREMENTS.md) or is a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from localllm.fit.bandwidth import DeviceSpeed


@dataclass(frozen=True)
class Efficiency:
    bandwidth: float  # e: share of the device's copy bandwidth a one-sequence decode step reaches
    extra_row: float  # r (CPU): what one more sequence in a step costs, as a share of a one-sequence step
    compute: float  # c (GPU): share of the dense tensor throughput a further sequence's products reach
    source: str


# (backend, "cpu" | "gpu", weight format or "*")
EFFICIENCY: dict[tuple[str, str, str], Efficiency] = {
    ("llamacpp", "cpu", "*"): Efficiency(
        0.44, 0.36, 0.0,
        "measured: the starter's decode on 2 shared cores reads its 0.25 GB a token at 0.44 of the copy bandwidth "
        "(benchmarks/decode_prediction.py); 8 rows a step cost 3.5 steps of one (benchmarks/llamacpp_row_cost.py)",
    ),
    ("llamacpp", "gpu", "*"): Efficiency(
        0.50, 0.0, 0.05,
        "a guess, not measured here: published llama.cpp figures for an 8B Q4_K (5 GB) model, ~92 tok/s on an "
        "RTX 3090 and ~110 on a 3090 Ti, are 0.49-0.54 of their spec bandwidth; compute a guess that puts its "
        "batched throughput at 64 requests about 2x below a vLLM-like engine, as published comparisons report 2-3x",
    ),
    ("native", "cpu", "float32"): Efficiency(
        0.41, 0.17, 0.0,
        "measured: the starter's decode on 2 shared cores reads its 1.07 GB a token at 0.41 of the copy bandwidth "
        "(benchmarks/decode_prediction.py); 16 sequences a step cost 3.6 steps of one (benchmarks/native_cpu.py)",
    ),
    ("native", "cpu", "bfloat16"): Efficiency(
        0.26, 0.17, 0.0,
        "measured: the starter's bfloat16 decode on 2 shared cores reads its 0.54 GB a token at 0.26 of the copy "
        "bandwidth (benchmarks/decode_prediction.py; 1.3x float32's speed); the batch cost is float32's, a guess",
    ),
    ("native", "cpu", "int8"): Efficiency(
        0.22, 0.17, 0.0,
        "measured: the starter's int8 decode on 2 cores reads its 0.27 GB a token at 0.22 of the copy bandwidth "
        "(benchmarks/decode_prediction.py, 2026-12-07: 27 tok/s, 2.0x float32); the batch cost is float32's, a guess",
    ),
    ("native", "cpu", "int4"): Efficiency(
        0.20, 0.17, 0.0,
        "measured: the starter's int4 decode on 2 cores reads its 0.17 GB a token at 0.20 of the copy bandwidth "
        "(benchmarks/decode_prediction.py, 2026-12-07: 40 tok/s, 3.0x float32, as fast as llama.cpp's Q4_K_M there); "
        "the batch cost is float32's, a guess",
    ),
    ("native", "cpu", "*"): Efficiency(
        0.05, 0.17, 0.0, "a guess: fp8 runs on the CPU only as a test path (torch's CPU fp8 product is slow)",
    ),
    ("native", "gpu", "bfloat16"): Efficiency(
        0.48, 0.0, 0.50,
        "measured: a 1B-shape bf16 decode forward in 1.26 ms where its weights take 0.6 ms to read "
        "(H200, benchmarks/gpu_check.py); compute a guess",
    ),
    ("native", "gpu", "float32"): Efficiency(0.48, 0.0, 0.25, "a guess: bfloat16's measured figure; float32 has no fast tensor cores"),
    ("native", "gpu", "*"): Efficiency(
        0.40, 0.0, 0.25, "a guess: the int4/int8/fp8 GPU kernels are not measured yet (the goal is 0.60 of the roofline)",
    ),
}


def efficiency(backend: str, device_kind: str, weights: str) -> Efficiency:
    return EFFICIENCY.get((backend, device_kind, weights)) or EFFICIENCY[(backend, device_kind, "*")]


@dataclass(frozen=True)
class DeviceShare:
    """What one device of a plan reads and computes per decode step."""

    device: DeviceSpeed
    efficiency: Efficiency
    weight_bytes: int  # read once a step
    kv_bytes: int  # read per sequence a step
    parameters: int  # multiplied per sequence a step

    def step_s(self, n: int) -> float:
        rate = self.device.bytes_per_s * self.efficiency.bandwidth
        memory = (self.weight_bytes + n * self.kv_bytes) / rate
        if self.device.flops_per_s:
            row = 2 * self.parameters / (self.device.flops_per_s * self.efficiency.compute)
        else:
            row = self.efficiency.extra_row * (self.weight_bytes + self.kv_bytes) / rate
        return memory + (n - 1) * row


@dataclass(frozen=True)
class SpeedModel:
    shares: tuple[DeviceShare, ...]

    def step_s(self, n: int) -> float:
        return sum(s.step_s(n) for s in self.shares)

    def decode_tok_s(self) -> float:
        """One sequence's tokens a second."""
        return 1.0 / self.step_s(1)

    def throughput_tok_s(self, n: int) -> float:
        """All `n` sequences' tokens a second, decoding together."""
        return n / self.step_s(max(1, n))

    @property
    def read_bytes(self) -> int:
        """Bytes one decode step of one sequence reads."""
        return sum(s.weight_bytes + s.kv_bytes for s in self.shares)
