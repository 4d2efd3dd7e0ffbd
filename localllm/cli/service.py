"""`localllm service install|uninstall|status`: run `localllm serve` at login.

Linux gets a systemd user unit, macOS a launchd agent. The unit runs this
Python with `-m localllm serve`, so it keeps working whichever way localllm
was installed (virtual environment, installer, wheel).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from localllm.core.atomic import write_bytes_atomic
from localllm.core.env_vars import env_base_folder, env_folder
from localllm.core.errors import LocalLLMError

UNIT_NAME = "localllm.cli.service"
AGENT_LABEL = "dev.localllm.serve"


class ServiceError(LocalLLMError):
    """The service manager is missing or refused."""


def serve_command() -> list[str]:
    return [sys.executable, "-m", "localllm", "serve", "--host", "127.0.0.1"]


def systemd_unit() -> str:
    command = " ".join(_quote(part) for part in serve_command())
    home = env_folder("LOCALLLM_HOME")  # no control characters: a newline would add unit lines
    env = f"Environment=LOCALLLM_HOME={_quote(str(home.absolute()))}\n" if home else ""
    return (
        "[Unit]\n"
        "Description=localllm API server (OpenAI- and Ollama-compatible, on 127.0.0.1)\n"
        "After=network.target\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={command}\n"
        f"{env}"
        "Restart=on-failure\n"
        "RestartSec=3\n\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def launchd_plist() -> str:
    arguments = "\n".join(f"        <string>{escape(part)}</string>" for part in serve_command())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
        '<plist version="1.0">\n<dict>\n'
        f"    <key>Label</key>\n    <string>{AGENT_LABEL}</string>\n"
        f"    <key>ProgramArguments</key>\n    <array>\n{arguments}\n    </array>\n"
        "    <key>RunAtLoad</key>\n    <true/>\n    <key>KeepAlive</key>\n    <true/>\n"
        "</dict>\n</plist>\n"
    )


def unit_path() -> Path:
    if platform.system() == "Darwin":
        return Path.home() / "Library" / "LaunchAgents" / f"{AGENT_LABEL}.plist"
    config = env_base_folder("XDG_CONFIG_HOME") or Path.home() / ".config"
    return config / "systemd" / "user" / UNIT_NAME


def install() -> str:
    path = unit_path()
    if platform.system() == "Darwin":
        write_bytes_atomic(path, launchd_plist().encode())
        _run(["launchctl", "load", "-w", str(path)])
    else:
        write_bytes_atomic(path, systemd_unit().encode())
        _run(["systemctl", "--user", "daemon-reload"])
        _run(["systemctl", "--user", "enable", "--now", UNIT_NAME])
    return f"installed and started: {path}"


def uninstall() -> str:
    path = unit_path()
    if not path.exists():
        return "the service is not installed"
    if platform.system() == "Darwin":
        _run(["launchctl", "unload", "-w", str(path)], check=False)
        path.unlink()
    else:
        _run(["systemctl", "--user", "disable", "--now", UNIT_NAME], check=False)
        path.unlink()
        _run(["systemctl", "--user", "daemon-reload"], check=False)
    return f"stopped and removed: {path}"


def status() -> str:
    path = unit_path()
    if not path.exists():
        return "not installed (`localllm service install` runs the API server at login)"
    if platform.system() == "Darwin":
        result = _run(["launchctl", "list", AGENT_LABEL], check=False)
    else:
        result = _run(["systemctl", "--user", "is-active", UNIT_NAME], check=False)
    state = (result.stdout or result.stderr).strip().splitlines()
    return f"installed at {path}; {state[0] if state else 'state unknown'}"


def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(command[0]) is None:
        raise ServiceError(f"{command[0]} was not found; install the unit by hand from packaging/ (see README)")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ServiceError(f"`{' '.join(command)}` failed: {detail[-1] if detail else result.returncode}")
    return result


def _quote(part: str) -> str:
    """systemd's quoting: wrap in double quotes when the word has spaces or quotes."""
    if any(c in part for c in ' "\\'):
        return '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return part
