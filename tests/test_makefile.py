"""`make run` installs light, `make test` everything: what make would do (`make -n`), per machine.

Each case points VENV at a temporary folder, so the checkout's own .venv is
neither read nor written; `make -n` prints the commands without running them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FULL = 'pip install -e ".[starter,chat,native,test]"'
LIGHT = 'pip install -e ".[starter,chat]"'
LIGHT_WITH_NATIVE = 'pip install -e ".[starter,chat,native]"'

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_free_environment() -> dict[str, str]:
    """This environment without what an outer `make` (e.g. `make test`) passes down to sub-makes:
    with MAKELEVEL set, `make -n` adds "Entering/Leaving directory" lines."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}


def plan(venv: Path, target: str, *, gpu: bool = False, extra: tuple[str, ...] = (), tmp: Path) -> str:
    """The commands `make TARGET` would run, on a machine with or without nvidia-smi."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    if gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
        smi.chmod(0o755)
    elif smi.exists():
        smi.unlink()
    # PATH without any real nvidia-smi: the fake one's folder, then the system's basic folders.
    env = {**make_free_environment(), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("NATIVE", None)
    done = subprocess.run(["make", "-n", target, f"VENV={venv}", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_make_run_on_a_machine_without_a_gpu_installs_no_native_engine(tmp_path):
    out = plan(tmp_path / "venv", "run", tmp=tmp_path)
    assert LIGHT in out and "native" not in out and "test]" not in out
    assert out.strip().splitlines()[-1].endswith("/bin/localllm chat")


def test_make_run_adds_the_native_engine_with_a_gpu_or_when_asked(tmp_path):
    assert LIGHT_WITH_NATIVE in plan(tmp_path / "venv", "run", gpu=True, tmp=tmp_path)
    assert LIGHT_WITH_NATIVE in plan(tmp_path / "venv", "run", extra=("NATIVE=1",), tmp=tmp_path)


def test_a_light_install_does_not_satisfy_make_test_but_a_full_one_satisfies_make_run(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".run-stamp-starter-chat").touch()  # what `make run` leaves (newer than the Makefile)
    assert "pip install" not in plan(venv, "run", tmp=tmp_path)
    full = plan(venv, "test", tmp=tmp_path)
    assert FULL in full
    *_, touched, contracts, suite = full.strip().splitlines()  # the full install's stamps, the import contracts, pytest
    assert touched.startswith("touch ") and ".installed-stamp" in touched
    assert contracts.endswith("/bin/lint-imports") and suite.endswith("-m pytest -q")
    for stamp in touched.split()[1:]:
        Path(stamp).touch()  # as `make test` would
    assert "pip install" not in plan(venv, "run", tmp=tmp_path)
    assert "pip install" not in plan(venv, "run", extra=("NATIVE=1",), tmp=tmp_path)  # the full install has torch
    assert "pip install" not in plan(venv, "test", tmp=tmp_path)
