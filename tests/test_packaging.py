"""Packaging: the installer script, service units and container recipes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"


def ensure(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if not found:
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            subprocess.run(command, capture_output=True, timeout=600)
        found = shutil.which(tool)
    if not found:
        pytest.fail(f"{tool} is needed here and could not be installed with apt-get ({package})")
    return found


def test_installer_is_shellcheck_clean():
    shellcheck = ensure("shellcheck", "shellcheck")
    result = subprocess.run([shellcheck, str(PACKAGING / "install.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def fake_bin(tmp_path: Path, name: str, script: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    return folder


def installer(tmp_path: Path, *args: str, path_prefix: Path | None = None) -> str:
    env = {**os.environ, "LOCALLLM_APP_DIR": str(tmp_path / "app"), "LOCALLLM_BIN_DIR": str(tmp_path / "bin-out"),
           "LOCALLLM_PYTHON": sys.executable}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    result = subprocess.run(["bash", str(PACKAGING / "install.sh"), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_installer_builds_llama_cpp_with_cuda_when_nvidia_smi_sees_a_gpu(tmp_path):
    gpu = fake_bin(tmp_path, "nvidia-smi", "echo 'GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-x)'\n")
    plan = installer(tmp_path, "--dry-run", path_prefix=gpu)
    assert "for cuda" in plan
    assert "CMAKE_ARGS=-DGGML_CUDA=on" in plan and "--no-cache-dir" in plan
    assert "starter,chat,native" in plan.replace("\\", ""), plan
    assert "ln -sf" in plan


def test_installer_stays_on_cpu_without_a_gpu(tmp_path):
    no_gpu = fake_bin(tmp_path, "nvidia-smi", "exit 9\n")
    plan = installer(tmp_path, "--dry-run", path_prefix=no_gpu)
    assert "for cpu" in plan and "GGML_CUDA" not in plan and "native" not in plan


def test_uninstall_keeps_models_unless_purged(tmp_path):
    assert "models and chats stay" in installer(tmp_path, "--uninstall", "--dry-run")
    assert "rm -rf" in installer(tmp_path, "--uninstall", "--purge", "--dry-run")


def test_service_install_writes_a_unit_and_enables_it(tmp_path):
    log = tmp_path / "systemctl.log"
    tools = fake_bin(tmp_path, "systemctl", f'echo "$@" >> {log}\necho active\n')
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "LOCALLLM_HOME": str(tmp_path / "home")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "localllm", "service", *a], capture_output=True, text=True, env=env)  # noqa: E731
    result = run("install")
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "config/systemd/user/localllm.cli.service").read_text()
    assert f"ExecStart={sys.executable} -m localllm serve --host 127.0.0.1" in unit
    assert f"LOCALLLM_HOME={tmp_path / 'home'}" in unit
    assert "--user enable --now localllm.cli.service" in log.read_text()
    assert "active" in run("status").stdout
    assert run("uninstall").returncode == 0
    assert not (tmp_path / "config/systemd/user/localllm.cli.service").exists()
    assert "not installed" in run("status").stdout


def test_service_without_systemctl_is_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = subprocess.run([sys.executable, "-m", "localllm", "service", "install"], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "systemctl" in result.stderr


@pytest.mark.parametrize("recipe", ["Containerfile.cpu", "Containerfile.cuda"])
def test_container_recipes_are_multi_stage_non_root_with_a_healthcheck(recipe):
    text = (PACKAGING / "container" / recipe).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert sum(line.startswith("FROM ") for line in lines) == 2
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
    assert any(line.startswith("HEALTHCHECK") for line in lines) and "/health" in text
    assert any(line.startswith("VOLUME") for line in lines)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{recipe} copies {source}, which is not in the tree"


def test_desktop_launcher_opens_the_chat_in_a_terminal():
    entry = (PACKAGING / "desktop" / "localllm.desktop").read_text()
    assert "Exec=localllm chat" in entry and "Terminal=true" in entry and "Type=Application" in entry
