"""The llama.cpp path works on a light install: no torch, numba, safetensors, tokenizers.

`make run` leaves the native engine out unless it can be used, so every verb
that runs on llama.cpp must neither import those modules at start-up nor need
them later. Each command here runs in a subprocess whose import system does
not see them (a sitecustomize on PYTHONPATH wraps every module finder, so
`import torch` fails and `importlib.util.find_spec("torch")` is None, exactly
as when they are not installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from localllm.store.store import DEFAULT_CHAT_MODEL
from server_harness import ROOT, start_server

HIDDEN = ("torch", "numba", "safetensors", "tokenizers", "triton", "transformers")

SITECUSTOMIZE = textwrap.dedent(
    f"""
    import sys

    HIDDEN = {HIDDEN!r}


    class _Hiding:
        def __init__(self, inner):
            self._inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            find = getattr(self._inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self._inner, attr)


    sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]
    """
)


@pytest.fixture(scope="module")
def light_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose Python cannot see the native engine's modules, and a fresh model home."""
    hider = tmp_path_factory.mktemp("hide-native")
    (hider / "sitecustomize.py").write_text(SITECUSTOMIZE)
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "PYTHONPATH": str(hider), "LOCALLLM_HOME": str(home)}
    env.pop("LOCALLLM_API_KEY", None)
    return env


def localllm(env: dict[str, str], *args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], cwd=ROOT, env=env, input=stdin,
        capture_output=True, text=True, timeout=timeout,
    )


def test_the_hider_really_hides(light_env):
    probe = "import importlib.util as u, sys; print(u.find_spec('torch')); import torch"
    done = subprocess.run([sys.executable, "-c", probe], env=light_env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "None"
    assert "No module named 'torch'" in done.stderr


def test_info_says_how_to_add_the_native_engine(light_env):
    done = localllm(light_env, "info")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("native")]
    assert len(lines) == 1 and "not installed" in lines[0]
    assert "pip install 'localllm[native]'" in lines[0] and "make run NATIVE=1" in lines[0]
    assert "torch        not installed" in done.stdout


def test_run_and_the_line_chat_answer_on_llamacpp(light_env):
    done = localllm(light_env, "run", DEFAULT_CHAT_MODEL, "Hi!", "--temperature", "0", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    chat = localllm(light_env, "chat", "--temperature", "0", "--max-tokens", "8", stdin="Hi!\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    for verb in (("ls",), ("show", DEFAULT_CHAT_MODEL), ("fit", DEFAULT_CHAT_MODEL)):
        done = localllm(light_env, *verb)
        assert done.returncode == 0, (verb, done.stderr)


def test_serve_starts_and_answers(light_env, monkeypatch):
    for key in ("PYTHONPATH", "LOCALLLM_HOME"):
        monkeypatch.setenv(key, light_env[key])
    server = start_server(Path(light_env["LOCALLLM_HOME"]), DEFAULT_CHAT_MODEL)
    try:
        reply = httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": DEFAULT_CHAT_MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
    finally:
        server.stop()
    assert "No module named" not in server.log_text()
