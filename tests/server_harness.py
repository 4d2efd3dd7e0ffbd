"""Helpers for the API tests: a real `localllm serve` process, a model store, GGUF copies.

The server runs as `python -m localllm serve ... --port 0` against a store in a
temporary LOCALLLM_HOME; the port it picked is read from its first line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from localllm.core.gguf_reader import read_gguf
from localllm.store.store import ModelStore
from localllm.core.config import Paths

ROOT = Path(__file__).resolve().parent.parent
STARTER_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def make_store(home: Path, models: dict[str, Path]) -> ModelStore:
    """A store under `home` with each file installed under its name (hard links where possible)."""
    store = ModelStore(Paths(home))
    for name, source in models.items():
        target = store.folder_for(name) / source.name
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        sha = STARTER_SHA256 if name == "starter" else "0" * 64
        store.add(name, source=f"test:{source.name}", file=target, sha256=sha)
    return store


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    home: Path, *args: str, wait_healthy: bool = True, timeout_s: float = 90.0, env: dict[str, str] | None = None
) -> Server:
    """`localllm serve ARGS --port 0` with LOCALLLM_HOME=home (and `env` on top); returns once /health answers 200."""
    log = home / f"serve-{time.monotonic_ns()}.log"
    base = {**os.environ, "LOCALLLM_HOME": str(home)}
    base.pop("LOCALLLM_API_KEY", None)
    env = {**base, **(env or {})}
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "localllm", "serve", *args, "--port", "0"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    url = None
    while time.monotonic() < deadline:
        match = re.search(r"localllm API on (http://\S+?)\s", log.read_text(errors="replace"))
        if match:
            url = match.group(1)
            break
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    if url is None:
        process.kill()
        raise RuntimeError(f"serve did not start: {log.read_text(errors='replace')}")
    server = Server(process, url, log)
    if wait_healthy:
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        server.stop()
        raise RuntimeError(f"serve never became healthy: {log.read_text(errors='replace')}")
    return server


# -- GGUF copies -----------------------------------------------------------------------

GGUF_UINT32, GGUF_STRING = 4, 8


def served(server: Server) -> Iterator[Server]:
    """A server fixture's life: yield the server, stop it, and check that no request broke it (its log holds no traceback)."""
    yield server
    server.stop()
    assert "Traceback" not in server.log_text(), server.log_text()


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def copy_with_string_key(source: Path, target: Path, key: str, value: str) -> Path:
    """A copy of a GGUF file with one more string key/value (e.g. tokenizer.chat_template)."""
    return copy_with_key(source, target, key, struct.pack("<I", GGUF_STRING) + _gguf_string(value))


def copy_with_uint32_key(source: Path, target: Path, key: str, value: int) -> Path:
    """A copy of a GGUF file with one more uint32 key/value (e.g. an architecture's pooling_type)."""
    return copy_with_key(source, target, key, struct.pack("<II", GGUF_UINT32, value))


def copy_with_key(source: Path, target: Path, key: str, typed_value: bytes) -> Path:
    """A copy of a GGUF file with one more key; `typed_value` is the GGUF type code and the value's bytes.

    Key/values come right before the tensor table; the new pair is appended to
    them and the data section is re-aligned, which leaves every tensor offset
    (relative to the data section) as it was.
    """
    gguf = read_gguf(source)
    if key in gguf.metadata:
        raise ValueError(f"{source} already has {key}")
    first = gguf.tensors[0]
    record = (
        _gguf_string(first.name)
        + struct.pack("<I", len(first.shape))
        + b"".join(struct.pack("<Q", d) for d in first.shape)
        + struct.pack("<I", first.ggml_type)
        + struct.pack("<Q", first.offset - gguf.data_offset)
    )
    table_size = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in gguf.tensors)
    with open(source, "rb") as src:
        header = src.read(gguf.data_offset)
        kv_end = header.find(record, 24)
        if kv_end < 0:
            raise ValueError("tensor table not found")
        table = header[kv_end : kv_end + table_size]
        n_kv = struct.unpack_from("<Q", header, 16)[0]
        new_header = (
            header[:16]
            + struct.pack("<Q", n_kv + 1)
            + header[24:kv_end]
            + _gguf_string(key)
            + typed_value
            + table
        )
        pad = -len(new_header) % gguf.alignment
        with open(target, "wb") as out:
            out.write(new_header + b"\0" * pad)
            src.seek(gguf.data_offset)
            shutil.copyfileobj(src, out, 16 * 1024 * 1024)
    return target


def copy_with_renamed_key(source: Path, target: Path, key: str) -> Path:
    """A copy whose key `key` is renamed (same length, last letter changed): llama.cpp then misses it."""
    shutil.copyfile(source, target)
    needle = _gguf_string(key)
    with open(target, "r+b") as f:
        head = f.read(8 * 1024 * 1024)
        at = head.find(needle)
        if at < 0:
            raise ValueError(f"{key} not found")
        f.seek(at + len(needle) - 1)
        f.write(b"X")
    return target


# A small Gemma-turn template that renders tools, tool calls (Hermes `<tool_call>` blocks)
# and tool results, written for these tests.
TOOL_TEMPLATE = r"""{{- bos_token -}}
{%- if tools -%}
<start_of_turn>user
You may call functions. Their signatures:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<end_of_turn>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
<start_of_turn>model
{% if message.content %}{{ message.content }}{% endif %}
{%- if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>{% endfor %}{% endif %}<end_of_turn>
{% elif message.role == 'tool' -%}
<start_of_turn>user
<tool_response>{{ message.content }}</tool_response><end_of_turn>
{% else -%}
<start_of_turn>user
{{ message.content }}<end_of_turn>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif -%}
"""

# A tool in OpenAI's shape for the template above: one string argument, bounded so a reply fits.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
