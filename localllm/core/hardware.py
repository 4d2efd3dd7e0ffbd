"""What this machine has: CPU, RAM, GPUs and which engines can use them.

`localllm info` prints it and the memory fit planner reads it, so detection
must never raise: every probe that can fail degrades to "unknown" or "none".
Slow or heavy probes (importing torch, running nvidia-smi) happen only inside
`detect`, never at import time.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency, but info must still work
    psutil = None  # type: ignore[assignment]

MIB = 1024 * 1024

NVIDIA_SMI_QUERY = "index,name,memory.total,memory.free,compute_cap,driver_version"
# Drivers older than ~510 reject compute_cap; we retry without it.
NVIDIA_SMI_QUERY_OLD = "index,name,memory.total,memory.free,driver_version"
NVIDIA_SMI_TIMEOUT_S = 5.0

# SIMD features that decide which llama.cpp kernels run fast, in display order.
# Keys are names as /proc/cpuinfo or sysctl spell them; values are what we report.
_INTERESTING_FLAGS: dict[str, str] = {
    "sse3": "sse3",
    "pni": "sse3",
    "ssse3": "ssse3",
    "sse4_1": "sse4_1",
    "sse4.1": "sse4_1",
    "sse4_2": "sse4_2",
    "sse4.2": "sse4_2",
    "avx": "avx",
    "avx1.0": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx_vnni": "avx_vnni",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni",
    "avx512vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
    "neon": "neon",
    "asimd": "neon",
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
}
_FLAG_ORDER: list[str] = list(dict.fromkeys(_INTERESTING_FLAGS.values()))


@dataclass
class GPU:
    """One accelerator with its memory, as the fit planner needs it."""

    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    compute_capability: str | None  # "8.9"
    driver: str | None
    source: str  # "torch" or "nvidia-smi"


@dataclass
class LlamaCppSupport:
    """Whether llama-cpp-python imports, and which GPU backends it was built with."""

    installed: bool = False  # True only when `import llama_cpp` succeeded
    version: str | None = None
    gpu_offload: bool = False
    cuda: bool = False
    metal: bool = False
    system_info: str | None = None


@dataclass
class Hardware:
    """A snapshot of the machine; `to_dict` is what `info --json` prints."""

    os: str
    os_release: str
    machine: str
    python: str
    cpu_model: str
    physical_cores: int
    logical_cores: int
    cpu_flags: list[str]
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: list[GPU] = field(default_factory=list)
    torch_version: str | None = None
    torch_cuda_available: bool = False
    torch_cuda_version: str | None = None
    llama_cpp: LlamaCppSupport = field(default_factory=LlamaCppSupport)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, ready for json.dumps."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- nvidia-smi


def _smi_field(value: str) -> str | None:
    """nvidia-smi writes unknowns as "[N/A]", "[Not Supported]" and the like."""
    value = value.strip()
    if not value or value.startswith("[") or value.upper() in {"N/A", "NOT SUPPORTED"}:
        return None
    return value


def _mib_to_bytes(value: str | None) -> int:
    """Unknown memory is 0 bytes: the planner then offloads nothing to that GPU."""
    if value is None:
        return 0
    try:
        return int(float(value) * MIB)
    except ValueError:
        return 0


def parse_nvidia_smi(text: str) -> list[GPU]:
    """GPUs from `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` output.

    Accepts both the full query (6 fields) and the old-driver query without
    compute_cap (5 fields). Lines that do not parse are skipped, never raised on.
    """
    gpus: list[GPU] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 6:
            index, name, total, free, cap, driver = parts
        elif len(parts) == 5:
            index, name, total, free, driver = parts
            cap = ""
        else:
            continue
        try:
            idx = int(index)
        except ValueError:
            continue
        gpus.append(
            GPU(
                index=idx,
                name=_smi_field(name) or "unknown GPU",
                vram_total_bytes=_mib_to_bytes(_smi_field(total)),
                vram_free_bytes=_mib_to_bytes(_smi_field(free)),
                compute_capability=_smi_field(cap),
                driver=_smi_field(driver),
                source="nvidia-smi",
            )
        )
    return gpus


def _run_nvidia_smi(query: str) -> str | None:
    """stdout of one nvidia-smi query, or None on any failure."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def nvidia_smi_gpus() -> list[GPU]:
    """GPUs as nvidia-smi sees them; [] when it is absent, hangs or fails."""
    for query in (NVIDIA_SMI_QUERY, NVIDIA_SMI_QUERY_OLD):
        out = _run_nvidia_smi(query)
        if out is not None:
            return parse_nvidia_smi(out)
    return []


# --------------------------------------------------------------------- torch


def _has_module(name: str) -> bool:
    """find_spec without importing; it raises for some broken installs."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# What the native engine imports (numba only speeds it up); all in the `native` extra.
NATIVE_ENGINE_MODULES = ("torch", "safetensors", "tokenizers")
NATIVE_ENGINE_INSTALL = "pip install 'localllm[native]' (in a checkout: make run NATIVE=1)"


def native_engine_missing() -> list[str]:
    """The native engine's modules that are not installed, found without importing them."""
    return [name for name in NATIVE_ENGINE_MODULES if not _has_module(name)]


def _import_torch() -> ModuleType | None:
    """torch, only if installed; importing it costs 1-2 s so callers ask lazily."""
    if not _has_module("torch"):
        return None
    try:
        return importlib.import_module("torch")
    except Exception:  # broken CUDA libs raise OSError, RuntimeError, ...
        return None


def _torch_gpus(torch: ModuleType) -> list[GPU]:
    """CUDA (or ROCm) devices torch can use; a device that errors is skipped."""
    gpus: list[GPU] = []
    try:
        count = torch.cuda.device_count()
    except Exception:
        return gpus
    for i in range(count):
        try:
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
        except Exception:
            continue
        gpus.append(
            GPU(
                index=i,
                name=str(props.name),
                vram_total_bytes=int(total),
                vram_free_bytes=int(free),
                compute_capability=f"{props.major}.{props.minor}",
                driver=None,
                source="torch",
            )
        )
    return gpus


def _probe_torch(hw: Hardware, probe_gpus: bool) -> None:
    """Fill the torch fields, and the GPU list when torch sees CUDA."""
    if not probe_gpus:
        # Without probing we still name the version, read cheaply from metadata.
        try:
            hw.torch_version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
        return
    torch = _import_torch()
    if torch is None:
        return
    hw.torch_version = str(getattr(torch, "__version__", "")) or None
    hw.torch_cuda_version = getattr(getattr(torch, "version", None), "cuda", None)
    try:
        hw.torch_cuda_available = bool(torch.cuda.is_available())
    except Exception:
        hw.torch_cuda_available = False
    if hw.torch_cuda_available:
        hw.gpus = _torch_gpus(torch)


def _detect_gpus(hw: Hardware) -> None:
    """torch first (exact free memory), nvidia-smi otherwise; smi adds the driver."""
    if hw.gpus:
        # CUDA_VISIBLE_DEVICES may renumber devices, but one host has one driver.
        smi = nvidia_smi_gpus()
        driver = next((g.driver for g in smi if g.driver), None)
        for gpu in hw.gpus:
            gpu.driver = driver
        return
    hw.gpus = nvidia_smi_gpus()


# ------------------------------------------------------------------ llama.cpp


def _backend_enabled(system_info: str, name: str) -> bool:
    """True when system info mentions a backend other than as "NAME = 0".

    Newer builds print "CUDA : ARCHS = 890 | ..." or "Metal : EMBED_LIBRARY = 1";
    older ones print "NAME = 1" / "NAME = 0" pairs.
    """
    pattern = rf"\b{re.escape(name)}\b(?!\s*=\s*0\b)"
    return re.search(pattern, system_info, re.IGNORECASE) is not None


def llama_cpp_support() -> LlamaCppSupport:
    """What the installed llama-cpp-python can do; each call is guarded."""
    support = LlamaCppSupport()
    if not _has_module("llama_cpp"):
        return support
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except Exception:  # a missing or mismatched shared library
        return support
    support.installed = True
    support.version = getattr(llama_cpp, "__version__", None)
    try:
        support.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        pass
    try:
        raw = llama_cpp.llama_print_system_info()
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        support.system_info = text.strip() or None
    except Exception:
        pass
    info = support.system_info or ""
    support.cuda = _backend_enabled(info, "CUDA")
    # On macOS the only offload backend llama.cpp ships is Metal.
    support.metal = _backend_enabled(info, "Metal") or (
        support.gpu_offload and sys.platform == "darwin"
    )
    return support


# ----------------------------------------------------------------------- CPU


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _sysctl(*names: str) -> str:
    """`sysctl -n` output on macOS/BSD, "" anywhere it fails."""
    exe = shutil.which("sysctl") or "/usr/sbin/sysctl"
    try:
        proc = subprocess.run(
            [exe, "-n", *names], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _cpuinfo_value(cpuinfo: str, *keys: str) -> str | None:
    """First value for any of keys in /proc/cpuinfo text ("key\t: value")."""
    for key in keys:
        match = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return None


def cpu_model() -> str:
    """Human CPU name; ARM Linux often lacks "model name", so try a few keys."""
    if sys.platform.startswith("linux"):
        value = _cpuinfo_value(_read_text("/proc/cpuinfo"), "model name", "Model", "Hardware")
        if value:
            return value
    elif sys.platform == "darwin":
        value = _sysctl("machdep.cpu.brand_string")
        if value:
            return value
    return platform.processor() or platform.machine() or "unknown"


def interesting_flags(tokens: list[str]) -> list[str]:
    """The SIMD features among raw flag tokens, normalised and in a stable order."""
    found = {_INTERESTING_FLAGS[t.lower()] for t in tokens if t.lower() in _INTERESTING_FLAGS}
    return [f for f in _FLAG_ORDER if f in found]


def cpu_flags() -> list[str]:
    """SIMD features llama.cpp cares about; [] where the OS does not tell us."""
    tokens: list[str] = []
    if sys.platform.startswith("linux"):
        cpuinfo = _read_text("/proc/cpuinfo")
        tokens = (_cpuinfo_value(cpuinfo, "flags", "Features") or "").split()
    elif sys.platform == "darwin":
        tokens = _sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features").split()
    if platform.machine().lower() in {"arm64", "aarch64"}:
        tokens.append("neon")  # mandatory on 64-bit ARM
    return interesting_flags(tokens)


def _logical_cores() -> int:
    return os.cpu_count() or 1


def _physical_cores() -> int:
    count = psutil.cpu_count(logical=False) if psutil is not None else None
    return count or _logical_cores()


def default_threads() -> int:
    """Physical cores: llama.cpp gains nothing from hyperthreads.

    Capped by the CPUs this process may run on, since a container pinned to
    fewer cores slows down badly when oversubscribed.
    """
    threads = _physical_cores()
    if hasattr(os, "sched_getaffinity"):
        try:
            threads = min(threads, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, threads)


def _ram() -> tuple[int, int]:
    """(total, available) bytes."""
    if psutil is not None:
        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    try:  # pragma: no cover - only without psutil
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0, 0


def _os_release() -> str:
    """macOS version ("14.5") rather than the Darwin kernel number."""
    if sys.platform == "darwin":
        mac = platform.mac_ver()[0]
        if mac:
            return mac
    return platform.release()


# -------------------------------------------------------------------- detect


def detect(*, probe_gpus: bool = True) -> Hardware:
    """Everything above in one snapshot; never raises.

    With probe_gpus=False torch is not imported and nvidia-smi not run, so
    `gpus` is [] and `torch_cuda_available` False meaning "not probed".
    """
    total, available = _ram()
    hw = Hardware(
        os=platform.system(),
        os_release=_os_release(),
        machine=platform.machine(),
        python=platform.python_version(),
        cpu_model=cpu_model(),
        physical_cores=_physical_cores(),
        logical_cores=_logical_cores(),
        cpu_flags=cpu_flags(),
        ram_total_bytes=total,
        ram_available_bytes=min(available, total),
    )
    _probe_torch(hw, probe_gpus)
    if probe_gpus:
        _detect_gpus(hw)
    hw.llama_cpp = llama_cpp_support()
    return hw
