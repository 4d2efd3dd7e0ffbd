"""The machine the planner plans for: this one, or one the user describes.

`localllm fit --vram 12GiB` answers "will it fit on a 12 GB card?" without
that card: the detected Hardware is copied and its GPUs replaced by
hypothetical ones. A hypothetical GPU is assumed to come with a CUDA build
of llama.cpp and of torch, since the question is about the card.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from localllm.core.errors import BadRequest
from localllm.fit.settings import FitSettings
from localllm.core.hardware import GPU, Hardware

RECENT_COMPUTE_CAPABILITY = "8.9"  # what --vram assumes without --compute-capability (Ada)
HYPOTHETICAL = "hypothetical"
_CC = re.compile(r"^\d{1,2}\.\d$")


@dataclass(frozen=True)
class HardwareWishes:
    """The hypothetical-hardware flags; None keeps what was detected."""

    vram: int | None = None  # bytes per GPU; 0: no GPU
    ram: int | None = None  # bytes of RAM available to the model
    gpus: int | None = None  # how many GPUs (0: none)
    compute_capability: str | None = None  # "8.6"
    gpu_name: str | None = None  # "RTX 4090": its bandwidth from the spec table (bandwidth.py)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.vram, self.ram, self.gpus, self.compute_capability, self.gpu_name))


def check_compute_capability(text: str) -> str:
    if not _CC.match(text.strip()):
        raise BadRequest(f"--compute-capability must look like 8.9 (major.minor), got {text!r}")
    return text.strip()


def hypothetical(hw: Hardware, wishes: HardwareWishes) -> Hardware:
    """`hw` with the flags' RAM and GPUs instead of the detected ones."""
    hw = copy.deepcopy(hw)
    if wishes.ram is not None:
        if wishes.ram <= 0:
            raise BadRequest("--ram must be more than 0")
        hw.ram_total_bytes = hw.ram_available_bytes = wishes.ram
    cc = check_compute_capability(wishes.compute_capability) if wishes.compute_capability else None
    if wishes.vram == 0 or wishes.gpus == 0:
        hw.gpus = []
        return hw
    if wishes.vram is not None:
        if wishes.vram < 0:
            raise BadRequest("--vram must be 0 (no GPU) or a size such as 12GiB")
        count = wishes.gpus or 1
        name = wishes.gpu_name or f"{HYPOTHETICAL} GPU"
        hw.gpus = [
            GPU(i, name, wishes.vram, wishes.vram, cc or RECENT_COMPUTE_CAPABILITY, None, HYPOTHETICAL)
            for i in range(count)
        ]
        _assume_cuda_builds(hw)
        return hw
    if wishes.gpus is not None or cc is not None or wishes.gpu_name is not None:
        if not hw.gpus:
            raise BadRequest("no GPU was found here: give --vram SIZE to plan for one")
        first = hw.gpus[0]
        count = wishes.gpus or len(hw.gpus)
        hw.gpus = [
            GPU(i, wishes.gpu_name or first.name, first.vram_total_bytes, first.vram_free_bytes, cc or first.compute_capability, first.driver, HYPOTHETICAL)
            for i in range(count)
        ]
        _assume_cuda_builds(hw)
    return hw


def _assume_cuda_builds(hw: Hardware) -> None:
    hw.llama_cpp.gpu_offload = hw.llama_cpp.cuda = True
    hw.llama_cpp.installed = True
    hw.torch_cuda_available = True
    hw.torch_version = hw.torch_version or HYPOTHETICAL


def probe() -> Hardware:
    """This machine, cheaply: torch is imported (1-2 s) only where nvidia-smi shows a GPU for it to see."""
    from localllm.core import hardware

    if hardware.nvidia_smi_gpus():
        return hardware.detect()
    return hardware.detect(probe_gpus=False)


# -- what the planner may use -------------------------------------------------------


def usable_ram(hw: Hardware, settings: FitSettings) -> int:
    """RAM a model may take: what is available now, less the margin (a share of all RAM)."""
    return max(0, hw.ram_available_bytes - int(settings.ram_margin_fraction * hw.ram_total_bytes))


def usable_vram(gpu: GPU, settings: FitSettings) -> int:
    return max(0, gpu.vram_free_bytes - settings.vram_margin_bytes)


def llamacpp_gpus(hw: Hardware) -> list[GPU]:
    """GPUs llama.cpp can offload to: only with a CUDA build of llama-cpp-python."""
    return list(hw.gpus) if hw.llama_cpp.cuda else []


def native_gpu(hw: Hardware, settings: FitSettings) -> GPU | None:
    """The GPU the native engine would run on: the roomiest that meets its bar, or None."""
    if not hw.torch_cuda_available:
        return None
    fit = [
        g
        for g in hw.gpus
        if g.vram_total_bytes >= settings.native_min_vram_bytes
        and _cc(g.compute_capability) >= settings.native_min_compute_capability
    ]
    return max(fit, key=lambda g: g.vram_free_bytes, default=None)


def cuda_gpu(hw: Hardware) -> GPU | None:
    """Any CUDA GPU torch can use (the native engine when forced onto a GPU below its bar)."""
    if not hw.torch_cuda_available or not hw.gpus:
        return None
    return max(hw.gpus, key=lambda g: g.vram_free_bytes)


def _cc(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0
