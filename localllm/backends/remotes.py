"""Models that live on another server: routing names to upstream OpenAI-compatible APIs.

A front end asks for a model by name. Most names are installed models; a name
listed in `remotes.toml` (in the localllm home) is served by an upstream
server instead — vLLM on a cluster, llama.cpp's server, another localllm:

    ["big-llama"]
    url = "http://gpu-head:8000/v1"              # the upstream's OpenAI base URL
    model = "meta-llama/Llama-3.3-70B-Instruct"  # its name there (default: the table's name)
    api_key_env = "BIG_LLAMA_KEY"                # the key is read from this variable
    timeout_s = 600                              # longest wait for the upstream's next bytes

Keys are named by environment variable, never written in the file, so the
file can be shared without sharing secrets. Nothing here talks to the network:
the remote backend (localllm.backends.remote) does that.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from localllm.core.config import paths
from localllm.core.env_vars import env_secret
from localllm.core.errors import BadRequest
from localllm.core.modelinfo import ModelInfo
from localllm.store.store import ResolvedModel

ROUTES_FILE = "remotes.toml"
_ROUTE_KEYS = {"url", "model", "api_key_env", "timeout_s"}


@dataclass(frozen=True)
class RemoteRoute:
    """One model name served by an upstream server."""

    name: str  # the name clients use
    url: str  # the upstream's OpenAI base URL, e.g. http://host:8000/v1
    model: str  # the name the upstream knows the model by
    api_key_env: str | None = None
    timeout_s: float | None = None  # None: the remote backend's default

    def api_key(self) -> str | None:
        """The key from the named environment variable; a route that names an unset one is an error."""
        if self.api_key_env is None:
            return None
        key = env_secret(self.api_key_env)
        if not key:
            raise BadRequest(f"remote model '{self.name}' reads its API key from ${self.api_key_env}, which is not set")
        return key


@dataclass
class RemoteModel(ResolvedModel):
    """A model an upstream server runs: a name and no local file."""

    upstream_name: str = ""

    @classmethod
    def named(cls, name: str, upstream_name: str | None = None) -> "RemoteModel":
        return cls(name, Path(), None, upstream_name or name)

    def info(self) -> ModelInfo:
        """What is known without asking the upstream (the backend asks when it opens)."""
        return remote_model_info(self.name, None)


def check_url(url: str) -> str:
    """An http(s) base URL without a trailing slash, or BadRequest naming the problem."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadRequest(f"remote URL must look like http://host:8000/v1, got {url!r}")
    if parts.query or parts.fragment:
        raise BadRequest(f"remote URL must not carry a query or fragment, got {url!r}")
    return url


def routes_path() -> Path:
    return paths().home / ROUTES_FILE


def load_routes(path: Path | None = None) -> dict[str, RemoteRoute]:
    """The routes in `path` (default: remotes.toml in the localllm home); none when it does not exist."""
    path = path or routes_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadRequest(f"{path} is not valid TOML: {exc}") from None
    return {name: _route(path, name, table) for name, table in data.items()}


def _route(path: Path, name: str, table: Any) -> RemoteRoute:
    where = f"{path} [{name}]"
    if not isinstance(table, dict):
        raise BadRequest(f"{where}: each model is a table with at least url = \"http://host:port/v1\"")
    unknown = sorted(set(table) - _ROUTE_KEYS)
    if unknown:
        raise BadRequest(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_ROUTE_KEYS))})")
    url = table.get("url")
    if not isinstance(url, str):
        raise BadRequest(f"{where}: url is required, e.g. url = \"http://host:8000/v1\"")
    model = table.get("model", name)
    key_env = table.get("api_key_env")
    timeout = table.get("timeout_s")
    if not isinstance(model, str) or not model:
        raise BadRequest(f"{where}: model must be a non-empty string")
    if key_env is not None and (not isinstance(key_env, str) or not key_env):
        raise BadRequest(f"{where}: api_key_env must name an environment variable")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise BadRequest(f"{where}: timeout_s must be a positive number of seconds")
    try:
        url = check_url(url)
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc}") from None
    return RemoteRoute(name, url, model, key_env, float(timeout) if timeout is not None else None)


# The chat template a remote model shows. The upstream renders the chat with its own template;
# this one writes the plain transcript the remote backend logs (RemoteBackend.render_chat) and
# tells the front ends two facts: a reply may open with <think>...</think> (reasoning that the
# upstream returned apart, or its model wrote), so they split it off as for a local reasoning
# model; and enable_thinking, like every template variable, travels upstream as
# chat_template_kwargs, so a request's think switch is honoured there.
REMOTE_TEMPLATE = (
    "{#- Rendered upstream by its own template: replies may open with <think>...</think>, "
    "and enable_thinking goes upstream in chat_template_kwargs. -#}\n"
    "{%- for m in messages %}{{ m.role }}: {{ m.content or '' }}\n{% endfor %}assistant:"
)


def remote_model_info(name: str, listing: dict[str, Any] | None) -> ModelInfo:
    """A ModelInfo from the upstream's /v1/models entry for the model (None: nothing known).

    vLLM adds `max_model_len`; llama.cpp's server adds `meta` (n_ctx_train,
    n_vocab, n_params, size). Shape fields no OpenAI API reports stay 0.
    """
    listing = listing or {}
    meta = listing.get("meta") if isinstance(listing.get("meta"), dict) else {}

    def number(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    return ModelInfo(
        path=Path(),
        format="remote",
        architecture=str(listing.get("owned_by") or "remote"),
        model_name=str(listing.get("id") or name),
        parameters=number(meta.get("n_params")),
        quantization="",
        size_bytes=number(meta.get("size")),
        context_length=number(listing.get("max_model_len")) or number(meta.get("n_ctx_train")),
        n_layers=0,
        n_heads=0,
        n_kv_heads=0,
        head_dim=0,
        hidden_size=number(meta.get("n_embd")),
        vocab_size=number(meta.get("n_vocab")),
        sliding_window=None,
        sliding_window_layers=[],
        rope_freq_base=None,
        chat_template=REMOTE_TEMPLATE,  # the upstream applies its own
        bos_token_id=None,
        eos_token_id=None,
        bos_token=None,
        eos_token=None,
        add_bos_token=True,
    )
