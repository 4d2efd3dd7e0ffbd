"""Hardware detection: pure parsers on sample text, probes against fakes and this machine."""

from __future__ import annotations

import json
import os
import stat
import sys
import types
from pathlib import Path

import pytest

from localllm.core import hardware
from localllm.core.hardware import GPU, MIB, Hardware, detect, parse_nvidia_smi

GIB = 1024 * MIB

ONE_GPU = "0, NVIDIA GeForce RTX 4090, 24564, 23870, 8.9, 550.54.15\n"
TWO_GPUS = (
    "0, NVIDIA A100-SXM4-80GB, 81920, 81037, 8.0, 535.104.05\n"
    "1, NVIDIA A100-SXM4-80GB, 81920, 40000, 8.0, 535.104.05\n"
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="fake nvidia-smi is a shell script")


# ------------------------------------------------------------ parse_nvidia_smi


def test_parse_one_gpu() -> None:
    assert parse_nvidia_smi(ONE_GPU) == [
        GPU(
            index=0,
            name="NVIDIA GeForce RTX 4090",
            vram_total_bytes=24564 * MIB,
            vram_free_bytes=23870 * MIB,
            compute_capability="8.9",
            driver="550.54.15",
            source="nvidia-smi",
        )
    ]


def test_parse_two_gpus() -> None:
    gpus = parse_nvidia_smi(TWO_GPUS)
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[1].vram_free_bytes == 40000 * MIB
    assert all(g.compute_capability == "8.0" for g in gpus)


def test_parse_unknown_fields_become_none_or_zero() -> None:
    text = "0, NVIDIA GH200 480GB, [N/A], [Not Supported], [N/A], 560.35.03\n"
    (gpu,) = parse_nvidia_smi(text)
    assert gpu.name == "NVIDIA GH200 480GB"
    assert gpu.vram_total_bytes == 0
    assert gpu.vram_free_bytes == 0
    assert gpu.compute_capability is None
    assert gpu.driver == "560.35.03"


def test_parse_old_driver_without_compute_cap() -> None:
    (gpu,) = parse_nvidia_smi("0, Tesla K80, 11441, 11385, 470.82.01\n")
    assert gpu.compute_capability is None
    assert gpu.driver == "470.82.01"
    assert gpu.vram_total_bytes == 11441 * MIB


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_parse_empty(text: str) -> None:
    assert parse_nvidia_smi(text) == []


def test_parse_garbage_lines_are_skipped() -> None:
    text = (
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
        "Field \"compute_cap\" is not a valid field to query.\n"
        "x, name, 1, 2, 3, 4\n"
        "0, Good GPU, lots, 12, 8.6, 1.0\n" + ONE_GPU.replace("0,", "1,", 1)
    )
    gpus = parse_nvidia_smi(text)
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].vram_total_bytes == 0  # "lots" is not a number
    assert gpus[0].vram_free_bytes == 12 * MIB


# ------------------------------------------------------------- fake nvidia-smi


def _fake_smi(tmp_path: Path, body: str) -> Path:
    """A shell script named nvidia-smi in its own bin dir."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bindir


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_import_torch", lambda: None)


def _on_path(monkeypatch: pytest.MonkeyPatch, bindir: Path) -> None:
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


@posix_only
def test_detect_uses_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_torch: None
) -> None:
    _on_path(monkeypatch, _fake_smi(tmp_path, f"cat <<'EOF'\n{TWO_GPUS}EOF\n"))
    hw = detect()
    assert [g.source for g in hw.gpus] == ["nvidia-smi", "nvidia-smi"]
    assert hw.gpus[0].vram_total_bytes == 81920 * MIB
    assert hw.gpus[0].driver == "535.104.05"
    assert hw.torch_version is None and not hw.torch_cuda_available
    json.dumps(hw.to_dict())


@posix_only
def test_nvidia_smi_retries_without_compute_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = (
        'case "$*" in *compute_cap*)\n'
        "  echo 'Field \"compute_cap\" is not a valid field to query.'; exit 2;;\n"
        "esac\n"
        "echo '0, Tesla K80, 11441, 11385, 470.82.01'\n"
    )
    _on_path(monkeypatch, _fake_smi(tmp_path, body))
    (gpu,) = hardware.nvidia_smi_gpus()
    assert gpu.name == "Tesla K80" and gpu.compute_capability is None


@posix_only
def test_nvidia_smi_failure_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _on_path(monkeypatch, _fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n"))
    assert hardware.nvidia_smi_gpus() == []


@posix_only
def test_nvidia_smi_hang_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _on_path(monkeypatch, _fake_smi(tmp_path, "exec sleep 10\n"))
    monkeypatch.setattr(hardware, "NVIDIA_SMI_TIMEOUT_S", 0.2)
    assert hardware.nvidia_smi_gpus() == []


def test_no_nvidia_smi_and_no_torch_means_no_gpus(
    monkeypatch: pytest.MonkeyPatch, no_torch: None
) -> None:
    monkeypatch.setattr(hardware.shutil, "which", lambda *a, **k: None)
    assert detect().gpus == []


# ----------------------------------------------------------------- fake torch


def _fake_torch() -> types.SimpleNamespace:
    props = types.SimpleNamespace(name="NVIDIA L4", major=8, minor=9)
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 1,
        get_device_properties=lambda i: props,
        mem_get_info=lambda i: (20 * GIB, 22 * GIB),
    )
    version = types.SimpleNamespace(cuda="12.4")
    return types.SimpleNamespace(__version__="2.4.0", version=version, cuda=cuda)


@posix_only
def test_torch_gpus_get_driver_from_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardware, "_import_torch", _fake_torch)
    _on_path(monkeypatch, _fake_smi(tmp_path, f"echo '{ONE_GPU.strip()}'\n"))
    hw = detect()
    assert hw.torch_version == "2.4.0" and hw.torch_cuda_version == "12.4"
    assert hw.torch_cuda_available
    assert hw.gpus == [GPU(0, "NVIDIA L4", 22 * GIB, 20 * GIB, "8.9", "550.54.15", "torch")]


def test_torch_without_cuda_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _fake_torch()
    torch.cuda.is_available = lambda: False
    monkeypatch.setattr(hardware, "_import_torch", lambda: torch)
    monkeypatch.setattr(hardware.shutil, "which", lambda *a, **k: None)
    hw = detect()
    assert hw.torch_version == "2.4.0"
    assert not hw.torch_cuda_available and hw.gpus == []


def test_probe_gpus_false_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise AssertionError("torch must not be imported")

    monkeypatch.setattr(hardware, "_import_torch", boom)
    monkeypatch.setattr(hardware, "nvidia_smi_gpus", boom)
    assert detect(probe_gpus=False).gpus == []


# ------------------------------------------------------------------- llama.cpp

CUDA_INFO = (
    "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | "
)
METAL_INFO = (
    "Metal : EMBED_LIBRARY = 1 | "
    "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | "
)
OLD_CPU_INFO = "AVX = 1 | AVX2 = 1 | METAL = 0 | CUDA = 0 | BLAS = 0 | "


@pytest.mark.parametrize(
    ("info", "cuda", "metal"),
    [
        (CUDA_INFO, True, False),
        (METAL_INFO, False, True),
        (OLD_CPU_INFO, False, False),
        ("", False, False),
    ],
)
def test_backend_enabled(info: str, cuda: bool, metal: bool) -> None:
    assert hardware._backend_enabled(info, "CUDA") is cuda
    assert hardware._backend_enabled(info, "Metal") is metal


def _install_fake_llama(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setattr(hardware, "_has_module", lambda name: name == "llama_cpp")


def test_llama_cpp_support_reads_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("llama_cpp")
    fake.__version__ = "0.3.16"  # type: ignore[attr-defined]
    fake.llama_supports_gpu_offload = lambda: True  # type: ignore[attr-defined]
    fake.llama_print_system_info = lambda: CUDA_INFO.encode()  # type: ignore[attr-defined]
    _install_fake_llama(monkeypatch, fake)
    support = hardware.llama_cpp_support()
    assert support.installed and support.version == "0.3.16"
    assert support.gpu_offload and support.cuda and not support.metal
    assert support.system_info == CUDA_INFO.strip()


def test_llama_cpp_support_survives_missing_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("llama_cpp")

    def broken() -> bytes:
        raise RuntimeError("symbol not found")

    fake.llama_print_system_info = broken  # type: ignore[attr-defined]
    _install_fake_llama(monkeypatch, fake)
    support = hardware.llama_cpp_support()
    assert support.installed and support.version is None
    assert not (support.gpu_offload or support.cuda or support.metal)
    assert support.system_info is None


def test_llama_cpp_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_has_module", lambda name: False)
    assert hardware.llama_cpp_support() == hardware.LlamaCppSupport()


# ------------------------------------------------------------------------ CPU


def test_interesting_flags_normalises_and_orders() -> None:
    tokens = "fpu avx2 sse avx pni fma f16c avx512f asimd asimddp sve AVX1.0".split()
    assert hardware.interesting_flags(tokens) == [
        "sse3", "avx", "avx2", "fma", "f16c", "avx512f", "neon", "dotprod", "sve"
    ]


def test_cpuinfo_value_first_matching_key() -> None:
    text = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nModel\t\t: Raspberry Pi 5\n"
    assert hardware._cpuinfo_value(text, "model name", "Model") == "Raspberry Pi 5"
    assert hardware._cpuinfo_value(text, "missing") is None


def test_default_threads() -> None:
    threads = hardware.default_threads()
    assert isinstance(threads, int) and 1 <= threads <= (os.cpu_count() or 1)


def test_default_threads_without_physical_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.psutil, "cpu_count", lambda logical=True: None)
    assert hardware.default_threads() >= 1


# ------------------------------------------------------------- this machine


def test_detect_on_this_machine() -> None:
    hw = detect()
    assert isinstance(hw, Hardware)
    assert hw.physical_cores >= 1 and hw.logical_cores >= hw.physical_cores
    assert hw.ram_total_bytes > GIB
    assert 0 < hw.ram_available_bytes <= hw.ram_total_bytes
    assert hw.cpu_model and hw.os and hw.python
    assert isinstance(hw.gpus, list)
    assert all(isinstance(f, str) for f in hw.cpu_flags)
    data = json.loads(json.dumps(hw.to_dict()))
    assert data["llama_cpp"]["installed"] == hw.llama_cpp.installed
    assert isinstance(data["gpus"], list)
