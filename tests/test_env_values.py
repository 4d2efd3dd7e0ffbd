"""Every environment variable localllm reads: a bad value is one line naming it, exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.core.errors import BadSetting

sys.path.insert(0, str(Path(__file__).parent))
from hub_emulator import HubEmulator  # noqa: E402

REF = "hf:test-org/Tiny-GGUF:Q4_K_M"


@pytest.fixture(scope="module")
def hub(tiny_gguf):
    emulator = HubEmulator()
    emulator.add_repo("test-org/Tiny-GGUF", {"tiny-Q4_K_M.gguf": tiny_gguf})
    with emulator:
        yield emulator


def localllm(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LOCALLLM_", "HF_"))}
    base.update(LOCALLLM_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0")
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], capture_output=True, text=True, env=base, timeout=180
    )


def one_line_naming(result: subprocess.CompletedProcess, variable: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unexpected" not in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert variable in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("value", ["abc", "-5", "1e12"])
def test_disk_free_bytes(value, hub, tmp_path):
    result = localllm(tmp_path / "home", "pull", REF, "--quiet", HF_ENDPOINT=hub.url, LOCALLLM_DISK_FREE_BYTES=value)
    line = one_line_naming(result, "LOCALLLM_DISK_FREE_BYTES")
    assert repr(value) in line or value in line


def test_hf_endpoint(tmp_path):
    for value in ("not a url", "ftp://example.com", "http://", "http://host:port"):
        one_line_naming(localllm(tmp_path / "home", "pull", REF, HF_ENDPOINT=value), "HF_ENDPOINT")


def test_hf_token_unfit_for_a_header(hub, tmp_path):
    line = one_line_naming(localllm(tmp_path / "home", "pull", REF, HF_ENDPOINT=hub.url, HF_TOKEN="tök\nen"), "HF_TOKEN")
    assert "tök" not in line  # a secret is never echoed


def test_home_that_is_a_file_or_too_long(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_naming(localllm(a_file, "ls"), "LOCALLLM_HOME")
    one_line_naming(localllm(tmp_path / ("d" * 300), "ls"), "LOCALLLM_HOME")


def test_remote_api_key(tmp_path):
    result = localllm(
        tmp_path / "home", "run", "--backend", "remote", "--url", "http://127.0.0.1:9/v1", "m", "hi",
        LOCALLLM_REMOTE_API_KEY="clé",
    )
    one_line_naming(result, "LOCALLLM_REMOTE_API_KEY")


@pytest.mark.parametrize(("variable", "value"), [
    ("LOCALLLM_FIT_CONTEXT_CAP", "abc"),
    ("LOCALLLM_FIT_RAM_MARGIN", "lots"),
    ("LOCALLLM_FIT_VRAM_MARGIN", "9" * 400),  # was an OverflowError
    ("LOCALLLM_FIT_NATIVE_MIN_VRAM", "big"),
])
def test_fit_settings(variable, value, tmp_path):
    one_line_naming(localllm(tmp_path / "home", "fit", "starter", **{variable: value}), variable)


def test_native_engine_switches(monkeypatch):
    """Read at every step of the native engine (a CLI run would load torch): checked the same way."""
    from native import kernels

    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "fast")
    with pytest.raises(BadSetting, match="LOCALLLM_NATIVE_ATTENTION must be one of auto, triton, reference, got 'fast'"):
        kernels.attention_choice()
    monkeypatch.setenv("LOCALLLM_NATIVE_ATTENTION", "Reference")
    assert kernels.attention_choice() == "reference"
    monkeypatch.setenv("LOCALLLM_NATIVE_FUSED", "maybe")
    with pytest.raises(BadSetting, match="LOCALLLM_NATIVE_FUSED must be on or off"):
        kernels.fusions_on()


def test_relative_xdg_folders_are_ignored_as_the_spec_says(monkeypatch, tmp_path):
    from localllm.core import config
    from localllm.cli import service

    monkeypatch.delenv("LOCALLLM_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.home_dir() == tmp_path / ".local" / "share" / "localllm"
    if sys.platform != "darwin":
        assert service.unit_path().is_relative_to(tmp_path / ".config")


def test_service_unit_cannot_be_given_extra_lines(monkeypatch, tmp_path):
    from localllm.cli import service

    monkeypatch.setenv("LOCALLLM_HOME", f"{tmp_path}\nExecStartPre=/bin/false")
    with pytest.raises(BadSetting, match="LOCALLLM_HOME must be a folder path without control characters"):
        service.systemd_unit()


def test_proxy_settings(tmp_path):
    one_line_naming(localllm(tmp_path / "home", "pull", REF, HTTPS_PROXY="::bad"), "HTTPS_PROXY")
