"""Smoke test: the real app on the real starter model in a real terminal (tmux)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest


def ensure_tmux() -> str:
    found = shutil.which("tmux")
    if found:
        return found
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "tmux"]):
        subprocess.run(command, capture_output=True, timeout=600)
    found = shutil.which("tmux")
    if not found:
        pytest.fail("tmux is needed for the TUI smoke test and could not be installed with apt-get")
    return found


def screen(tmux: str, session: str) -> str:
    return subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def wait_for(tmux: str, session: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = screen(tmux, session)
        if text in shown:
            return shown
        time.sleep(0.25)
    raise AssertionError(f"{text!r} did not appear; the screen shows:\n{screen(tmux, session)}")


def test_real_app_chats_with_the_starter_and_quits(tmp_path):
    tmux = ensure_tmux()
    session = f"localllm-{uuid.uuid4().hex[:8]}"
    command = (
        f"LOCALLLM_HOME={tmp_path} {sys.executable} -m localllm chat starter "
        f"--temperature 0 --max-tokens 24 --threads 2; echo APP-EXITED-$?; sleep 60"
    )
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "100", "-y", "30", command], check=True)
    try:
        wait_for(tmux, session, "model: starter", timeout=90)
        subprocess.run([tmux, "send-keys", "-t", session, "The capital of France is", "Enter"], check=True)
        shown = wait_for(tmux, session, "tok/s", timeout=90)
        assert "The capital of France is" in shown
        assert "TTFT" in shown and "24 tokens" in shown
        subprocess.run([tmux, "send-keys", "-t", session, "C-q"], check=True)
        shown = wait_for(tmux, session, "APP-EXITED-0", timeout=10)
        assert "Traceback" not in shown
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)
