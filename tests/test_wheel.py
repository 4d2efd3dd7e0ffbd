"""The wheel: built with `python -m build`, installed into a clean virtual environment, and used."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_built_wheel_installs_into_a_clean_venv_and_runs_the_starter(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT))
    wheels = list(dist.glob("localllm-*.whl"))
    assert wheels and list(dist.glob("localllm-*.tar.gz"))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", f"{wheels[0]}[starter]")
    home = {"LOCALLLM_HOME": str(tmp_path / "home"), "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    localllm = str(env_dir / "bin" / "localllm")
    assert run(localllm, "--version", env=home).stdout.startswith("localllm ")
    assert '"llama_cpp"' in run(localllm, "info", "--json", env=home).stdout
    run(localllm, "pull", "starter", "--quiet", env=home)
    out = run(localllm, "run", "starter", "The capital of France is", "--raw", "--temperature", "0",
              "--max-tokens", "6", env=home).stdout
    assert out.startswith(" the capital of the country")
    assert "qwen2.5:7b" in run(localllm, "ls", "--catalog", env=home).stdout  # the catalog ships in the wheel
