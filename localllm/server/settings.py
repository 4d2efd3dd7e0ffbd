"""What a server is asked to be: address, key, limits, and how models are kept.

One dataclass, filled by `localllm serve` (or by the terminal UI), read by
every part of the server. Nothing here starts anything.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from localllm.core.errors import BadRequest
from localllm.core.speculation import SpeculationOptions
from localllm.backends.remotes import RemoteRoute

# Ollama listens on 11434 and llama.cpp's server on 8080. The next port after
# Ollama's lets both run side by side; Ollama clients need only the port changed.
DEFAULT_PORT = 11435
DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_MAX_QUEUE = 64
DEFAULT_PARALLEL = 4  # `serve`: requests a model runs at once (llama.cpp slots sharing one KV cache)
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: str | None = None  # loaded at start-up; others load when a request names them
    api_key: str | None = None
    insecure_no_auth: bool = False  # serve a non-loopback address without a key, on purpose
    cors_origins: list[str] = field(default_factory=list)
    # Host names a request may address besides localhost, 127.0.0.1 and [::1] (a reverse proxy's
    # name). On loopback every other Host is refused (DNS rebinding); elsewhere only when given.
    allowed_hosts: list[str] = field(default_factory=list)
    keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S  # idle time before unloading; None: never
    max_loaded: int = 1  # models in memory at once; the least recently used goes first
    parallel: int = 1  # requests an engine runs at once
    max_queue: int = DEFAULT_MAX_QUEUE  # requests allowed to wait beyond those running
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    n_ctx: int | None = None
    n_threads: int | None = None
    backend: str = "auto"
    kv_cache_bytes: int | None = None  # native engine only
    speculation: SpeculationOptions = field(default_factory=SpeculationOptions)
    verbose: bool = False
    remote_url: str | None = None  # --backend remote: the upstream every request goes to
    remote_api_key: str | None = None
    remotes: dict[str, RemoteRoute] = field(default_factory=dict)  # model names served by upstreams (remotes.toml)

    def validate(self) -> "ServerSettings":
        """Refuse settings that are invalid or unsafe, with one line that says what to do."""
        if not 0 <= self.port <= 65535:
            raise BadRequest(f"--port must be between 0 and 65535, got {self.port}")
        for name in ("max_loaded", "parallel"):
            if getattr(self, name) < 1:
                raise BadRequest(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_queue < 0:
            raise BadRequest("--max-queue must be at least 0")
        if self.max_body_bytes < 1024:
            raise BadRequest("--max-body must be at least 1 KiB")
        if self.backend == "remote" and not self.remote_url:
            raise BadRequest("--backend remote needs --url, the upstream's OpenAI base URL (e.g. http://host:8000/v1)")
        if self.api_key is not None and not self.api_key.strip():
            raise BadRequest("the API key must not be empty")
        for name in self.allowed_hosts:
            if not _HOST_NAME.fullmatch(name):
                raise BadRequest(f"--allowed-host takes a host name without a port or scheme, such as llm.example.com; got {name!r}")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure_no_auth:
            raise BadRequest(
                f"refusing to serve {self.host} without an API key: anyone who can reach it could use it; "
                "pass --api-key-file PATH (or set LOCALLLM_API_KEY), or --insecure-no-auth if you really mean it"
            )
        return self


_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as exposed


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | int | float | None, what: str = "keep_alive") -> float | None:
    """Ollama's durations: "5m", "1h30m", "90s", a number of seconds; negative means forever (None).

    Returns seconds, or None for "never expire".
    """
    if value is None:
        raise BadRequest(f"{what} must be a duration such as 5m, 30s or -1")
    if isinstance(value, bool):
        raise BadRequest(f"{what} must be a duration such as 5m, 30s or -1, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if re.fullmatch(r"\d+(\.\d+)?", body):
            seconds = sign * float(body)
        else:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise BadRequest(f"{what} must be a duration such as 5m, 30s or -1, got {value!r}")
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise BadRequest(f"{what} must be a finite duration")
    return None if seconds < 0 else seconds


_SIZE = re.compile(r"(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(value: str, what: str) -> int:
    """Bytes from "8MiB", "512k", "1048576" (k, m, g alone are binary units)."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise BadRequest(f"{what} must be a size such as 8MiB, 512k or 1048576, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
