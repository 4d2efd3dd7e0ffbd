"""How fast a device reads memory (and a GPU multiplies): what the speed prediction divides by.

Decoding one token reads every weight once, so its speed is set by memory
bandwidth. A GPU's figures come from a measurement recorded for its name
(`record_gpu_bandwidth`, e.g. by benchmarks/gpu_check.py), else from its spec
sheet (GPU_SPECS, matched by the name nvidia-smi reports), else a
conservative default. The CPU's bandwidth is measured: numpy copies of a
buffer larger than any cache, one thread per core (up to 16), best of a few
rounds, about half a second; the result is cached in the localllm home
(bandwidth.json), keyed by CPU model and thread count, so `fit` stays fast.
Other programs' load only ever lowers a measurement, so the cache keeps the
best one and measures again once a day. LOCALLLM_FIT_CPU_BANDWIDTH and
LOCALLLM_FIT_GPU_BANDWIDTH ("25GiB": bytes per second) override both.

Copy bandwidth counts bytes read plus bytes written (STREAM's convention);
the efficiency factors in speed.py are relative to these figures.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from localllm.core.hardware import GPU, Hardware
from localllm.core.units import MIB, parse_size

GB = 1e9
TFLOPS = 1e12
DEFAULT_GPU_BYTES_PER_S = 300 * GB  # an unknown GPU: about a 4060's bandwidth...
DEFAULT_GPU_FLOPS = 30 * TFLOPS  # ...and tensor throughput
DEFAULT_CPU_BYTES_PER_S = 20 * GB  # when measuring fails: a dual-channel DDR4 desktop
CACHE_FILE = "bandwidth.json"
REMEASURE_AFTER_S = 24 * 3600
COPY_BYTES_PER_THREAD = 64 * MIB
MAX_COPY_THREADS = 16

# (words all in nvidia-smi's name, lowercase; label; memory bandwidth GB/s; dense bf16 tensor TFLOPS with
# float32 accumulation). NVIDIA's published specifications, rounded; the first match wins, so more specific
# names come first.
GPU_SPECS: tuple[tuple[tuple[str, ...], str, float, float], ...] = (
    (("h200",), "H200", 4800, 989),
    (("h100", "nvl"), "H100 NVL", 3900, 835),
    (("h100", "pcie"), "H100 PCIe", 2000, 756),
    (("h100",), "H100 SXM", 3350, 989),
    (("a100", "80gb"), "A100 80GB", 1935, 312),
    (("a100",), "A100 40GB", 1555, 312),
    (("l40s",), "L40S", 864, 362),
    (("l40",), "L40", 864, 181),
    (("rtx 5090",), "RTX 5090", 1792, 210),
    (("rtx 4090",), "RTX 4090", 1008, 165),
    (("rtx 4080",), "RTX 4080", 717, 97),
    (("rtx 4070", "ti", "super"), "RTX 4070 Ti SUPER", 672, 88),
    (("rtx 4070",), "RTX 4070", 504, 58),
    (("rtx 4060", "ti"), "RTX 4060 Ti", 288, 44),
    (("rtx 4060",), "RTX 4060", 272, 30),
    (("rtx 3090", "ti"), "RTX 3090 Ti", 1008, 80),
    (("rtx 3090",), "RTX 3090", 936, 71),
)


@dataclass(frozen=True)
class DeviceSpeed:
    label: str  # "RTX 4090", "CPU (2 threads)"
    bytes_per_s: float
    flops_per_s: float | None  # dense bf16 tensor throughput (GPUs); None on the CPU
    source: str  # "measured", "spec sheet", "default", "LOCALLLM_FIT_*_BANDWIDTH"

    def describe(self) -> str:
        return f"{self.bytes_per_s / GB:,.0f} GB/s ({self.label}, {self.source})"


def gpu_speed(gpu: GPU, environ: dict[str, str] | None = None) -> DeviceSpeed:
    """The GPU's bandwidth and tensor throughput: override, measurement, spec sheet, or default."""
    env = os.environ if environ is None else environ
    label, bandwidth, flops, source = gpu.name, DEFAULT_GPU_BYTES_PER_S, DEFAULT_GPU_FLOPS, "default"
    spec = spec_for(gpu.name)
    if spec is not None:
        label, bandwidth, flops, source = spec[0], spec[1] * GB, spec[2] * TFLOPS, "spec sheet"
    measured = _read_cache().get(_gpu_key(gpu.name))
    if measured:
        bandwidth, source = measured[0], "measured"
    if "LOCALLLM_FIT_GPU_BANDWIDTH" in env:
        bandwidth = parse_size(env["LOCALLLM_FIT_GPU_BANDWIDTH"], "LOCALLLM_FIT_GPU_BANDWIDTH")
        source = "LOCALLLM_FIT_GPU_BANDWIDTH"
    return DeviceSpeed(label, bandwidth, flops, source)


def spec_for(name: str) -> tuple[str, float, float] | None:
    """(label, GB/s, TFLOPS) of a GPU by the name nvidia-smi reports, or None for one not in GPU_SPECS."""
    lowered = name.lower()
    for words, label, bandwidth, flops in GPU_SPECS:
        if all(w in lowered for w in words):
            return label, bandwidth, flops
    return None


def record_gpu_bandwidth(name: str, bytes_per_s: float) -> None:
    """Remember a GPU's measured copy bandwidth for later plans (a benchmark that measured it calls this)."""
    _write_cache(_gpu_key(name), bytes_per_s)


def cpu_speed(hw: Hardware, threads: int | None = None, environ: dict[str, str] | None = None) -> DeviceSpeed:
    """This CPU's copy bandwidth with `threads` threads (default: its physical cores): cached measurement."""
    env = os.environ if environ is None else environ
    threads = max(1, min(threads or hw.physical_cores or 1, MAX_COPY_THREADS))
    label = f"CPU, {threads} thread{'s' if threads > 1 else ''}"
    if "LOCALLLM_FIT_CPU_BANDWIDTH" in env:
        value = parse_size(env["LOCALLLM_FIT_CPU_BANDWIDTH"], "LOCALLLM_FIT_CPU_BANDWIDTH")
        return DeviceSpeed(label, value, None, "LOCALLLM_FIT_CPU_BANDWIDTH")
    key = f"cpu:{hw.cpu_model}:{threads}"
    cached = _read_cache().get(key)
    if cached and time.time() - cached[1] < REMEASURE_AFTER_S:
        return DeviceSpeed(label, cached[0], None, "measured")
    measured = measure_copy_bandwidth(threads)
    if measured is None:
        return DeviceSpeed(label, cached[0] if cached else DEFAULT_CPU_BYTES_PER_S, None, "measured" if cached else "default")
    best = max(measured, cached[0] if cached else 0.0)  # load from other programs only ever lowers a measurement
    _write_cache(key, best)
    return DeviceSpeed(label, best, None, "measured")


def measure_copy_bandwidth(threads: int, rounds: int = 6) -> float | None:
    """Bytes read plus written per second by `threads` threads copying their own buffers; None if numpy fails."""
    try:
        import numpy as np

        sources = [np.ones(COPY_BYTES_PER_THREAD, dtype=np.uint8) for _ in range(threads)]
        targets = [np.empty(COPY_BYTES_PER_THREAD, dtype=np.uint8) for _ in range(threads)]
    except (ImportError, MemoryError):
        return None
    best = 0.0
    for _ in range(rounds):  # numpy lets go of the GIL while copying, so the threads copy at once
        workers = [threading.Thread(target=np.copyto, args=(t, s)) for s, t in zip(sources, targets)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            best = max(best, 2 * COPY_BYTES_PER_THREAD * threads / elapsed)
    return best or None


# -- the cache ------------------------------------------------------------------------------


def _gpu_key(name: str) -> str:
    return f"gpu:{name}"


def _cache_path() -> Path:
    from localllm.core.config import home_dir

    return home_dir() / CACHE_FILE


def _read_cache() -> dict[str, tuple[float, float]]:
    """key -> (bytes per second, when measured); anything malformed is left out."""
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, entry in data.items():
        if isinstance(entry, dict):
            value, at = entry.get("bytes_per_s"), entry.get("measured_at")
            if isinstance(value, (int, float)) and value > 0 and isinstance(at, (int, float)):
                out[key] = (float(value), float(at))
    return out


def _write_cache(key: str, value: float) -> None:
    """Best effort: a read-only home only means measuring again next time."""
    data = {k: {"bytes_per_s": v, "measured_at": at} for k, (v, at) in _read_cache().items()}
    data[key] = {"bytes_per_s": value, "measured_at": time.time()}
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass
