"""The ways a model could run here, each with its plan and predicted speed, and the choice among them.

A candidate is one backend with one weight format: llama.cpp with the GGUF's
own quant, or the native engine with float32, bfloat16, int8, int4 or fp8
weights on the device it would use. The automatic choice considers only
candidates that keep the file's precision (`auto_formats`): llama.cpp; on a
GPU the native engine in bfloat16 or in a quantized format with no fewer
bits a weight than the file holds on average, less one for its block
scales (a Q4_K_M 8B at 4.9 bits: int4, int8, bfloat16; the starter, whose
Q8_0 embedding table makes it 7.5 bits: int8, bfloat16; a 16-bit
checkpoint: bfloat16 only); on the CPU the native engine's automatic dtype.
Requantizing to fewer bits changes the model's answers, so those formats
are listed (with `--weights` a user may pick one) but never chosen for
them; so is fp8. For a GGUF the native engine on the CPU is listed too and
not chosen: it lacks llama.cpp's grammars and embeddings.

Among the automatic candidates that fit at the largest context any of them
reaches, `choose` takes the fastest: predicted single-stream decode for
one request at a time, predicted throughput for many (speed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localllm.core.hardware import Hardware
from localllm.core.modelinfo import ModelInfo
from localllm.fit import bandwidth
from localllm.fit.native_memory import NativeShape, compute_dtype_bytes, weight_parts
from localllm.fit.speed import DeviceShare, SpeedModel, efficiency
from localllm.fit.llamacpp_memory import KV_DTYPE_BYTES

VALUE_BITS = {"int4": 4, "int8": 8, "bfloat16": 16}  # the automatic choice's formats on a GPU
FP8_MIN_COMPUTE_CAPABILITY = 8.9


@dataclass
class Candidate:
    backend: str  # "llamacpp" | "native"
    weights: str  # a GGUF quant name for llama.cpp; a native weight format
    plan: object = field(compare=False, repr=False)  # its planner.Plan (memory, context, reasons)
    speed: SpeedModel
    auto: bool  # whether the automatic choice may pick it
    parallel: int

    @property
    def fits(self) -> bool:
        return self.plan.fits

    @property
    def decode_tok_s(self) -> float:
        return self.speed.decode_tok_s()

    @property
    def throughput_tok_s(self) -> float:
        return self.speed.throughput_tok_s(self.parallel)

    def metric(self) -> float:
        """What the choice compares: one stream's speed, or all parallel requests' together."""
        return self.decode_tok_s if self.parallel == 1 else self.throughput_tok_s

    @property
    def label(self) -> str:
        engine = "llama.cpp" if self.backend == "llamacpp" else "native"
        where = "" if self.backend == "llamacpp" or self.plan.device.startswith("cuda") else " on the CPU"
        return f"{engine} {self.weights}{where}"

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "weights": self.weights,
            "device": self.plan.device,
            "fits": self.fits,
            "auto": self.auto,
            "context_length": self.plan.context_length,
            "decode_tok_s": round(self.decode_tok_s, 1),
            "parallel": self.parallel,
            "throughput_tok_s": round(self.throughput_tok_s, 1),
            "read_bytes_per_token": self.speed.read_bytes,
            "ram_bytes": self.plan.ram_bytes,
            "vram_bytes": self.plan.vram_bytes,
        }


def file_bits_per_weight(info: ModelInfo) -> float:
    """The file's average bits a weight, block scales included (16 when unknown)."""
    return 8 * info.weight_bytes / info.parameters if info.parameters and info.weight_bytes else 16.0


def cpu_auto_format(hw: Hardware) -> str:
    """The native engine's automatic CPU format: bfloat16 where the processor computes it natively."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(hw.cpu_flags) else "float32"


def native_formats(cuda: bool, compute_capability: str | None) -> list[str]:
    """Weight formats the native engine runs at speed on the device: fp8 only on CUDA with compute capability 8.9."""
    formats = ["float32", "bfloat16", "int8", "int4"]
    if cuda and _cc(compute_capability) >= FP8_MIN_COMPUTE_CAPABILITY:  # the CPU runs fp8 only as a test path (seconds a step)
        formats.append("fp8")
    return formats


def auto_formats(info: ModelInfo, hw: Hardware, cuda: bool) -> list[str]:
    """Native formats the automatic choice may pick: the file's precision kept (see the module docstring)."""
    if not cuda:
        return [cpu_auto_format(hw)]
    bits = file_bits_per_weight(info)
    return [f for f, b in VALUE_BITS.items() if b >= bits - 1 or f == "bfloat16"]


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The fastest automatic candidate that fits at the largest context any of them reaches; None if none fits."""
    fitting = [c for c in candidates if c.auto and c.fits]
    if not fitting:
        return None
    longest = max(c.plan.context_length for c in fitting)
    return max((c for c in fitting if c.plan.context_length == longest), key=Candidate.metric)


def ask_for(candidate: Candidate, chosen: Candidate) -> str:
    """Why the automatic choice passes a candidate by, and the flags that pick it."""
    if candidate.backend == "llamacpp":
        return "--backend llamacpp"
    flags = f"--backend native --weights {candidate.weights}"
    if chosen.backend == "llamacpp" and candidate.plan.device == "cpu":
        return f"the native engine runs a GGUF on the CPU only when asked ({flags})"
    if candidate.weights in ("int4", "int8", "fp8"):
        return f"{candidate.weights} requantizes the file's weights to fewer bits ({flags})"
    return f"not the native engine's automatic format here ({flags})"


def runner_up(candidates: list[Candidate], chosen: Candidate) -> Candidate | None:
    """The best other fitting automatic candidate (else any other fitting one) to compare the choice with."""
    others = [c for c in candidates if c is not chosen and c.fits]
    pool = [c for c in others if c.auto] or others
    return max(pool, key=Candidate.metric, default=None)


# -- what each plan reads ------------------------------------------------------------------


def llamacpp_speed(info: ModelInfo, plan, hw: Hardware) -> SpeedModel:
    """llama.cpp's decode traffic: the layers on the GPU read there, the rest (and the embeddings) in RAM."""
    n = info.n_layers
    gpu_layers = plan.n_gpu_layers
    first_gpu = n + 1 - gpu_layers if gpu_layers else n + 1
    layers = (info.layer_weight_bytes[:n] + [0] * n)[:n]
    typical = max(1, plan.context_length // 2)
    kv_per_layer = [info.kv_bytes(typical, KV_DTYPE_BYTES) // max(1, n)] * n
    output = (info.output_bytes or info.token_embd_bytes) + info.other_bytes
    total = max(1, info.weight_bytes)
    on_gpu = [i >= first_gpu for i in range(n)]
    gpu_w = sum(w for w, g in zip(layers, on_gpu) if g) + (output if gpu_layers else 0)
    cpu_w = sum(w for w, g in zip(layers, on_gpu) if not g) + (0 if gpu_layers else output)
    gpu_kv = sum(k for k, g in zip(kv_per_layer, on_gpu) if g)
    cpu_kv = sum(k for k, g in zip(kv_per_layer, on_gpu) if not g)
    shares = []
    if cpu_w or cpu_kv:
        device = bandwidth.cpu_speed(hw)
        shares.append(DeviceShare(device, efficiency("llamacpp", "cpu", "*"), cpu_w, cpu_kv, info.parameters * cpu_w // total))
    if gpu_w:
        device = bandwidth.gpu_speed(hw.gpus[0])
        shares.append(DeviceShare(device, efficiency("llamacpp", "gpu", "*"), gpu_w, gpu_kv, info.parameters * gpu_w // total))
    return SpeedModel(tuple(shares))


def native_speed(info: ModelInfo, plan, weights: str, hw: Hardware) -> SpeedModel:
    """The native engine's decode traffic: its weights in `weights` and its KV cache, all on one device."""
    cuda = plan.device.startswith("cuda")
    read = weight_parts(NativeShape.from_info(info), weights).read_per_token
    kv = info.kv_bytes(max(1, plan.context_length // 2), compute_dtype_bytes(weights))
    if cuda:
        index = int(plan.device.split(":")[1])
        gpu = next(g for g in hw.gpus if g.index == index)
        device, kind = bandwidth.gpu_speed(gpu), "gpu"
    else:
        device, kind = bandwidth.cpu_speed(hw), "cpu"
    return SpeedModel((DeviceShare(device, efficiency("native", kind, weights), read, kv, info.parameters),))


def _cc(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0
