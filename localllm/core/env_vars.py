"""Reading environment variables: a bad value is one line that names the variable.

Every variable localllm reads goes through one of these, so `LOCALLLM_X=abc`
says "LOCALLLM_X must be ..., got 'abc'" instead of failing somewhere deeper
with an error that names nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from localllm.core.errors import BadSetting

MAX_PATH_PART_BYTES = 255
_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def env_int(name: str, *, minimum: int = 0) -> int | None:
    """A whole number, at least `minimum`; None when unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise BadSetting(f"{name} must be a whole number, got {_shown(text)}") from None
    if value < minimum:
        raise BadSetting(f"{name} must be at least {minimum}, got {value}")
    return value


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of `choices` (case-insensitive); `default` when unset or empty."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in choices:
        raise BadSetting(f"{name} must be one of {', '.join(choices)}, got {_shown(text)}")
    return text


def env_flag(name: str, default: bool) -> bool:
    """On (1/on/true/yes) or off (0/off/false/no); `default` when unset or empty."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in _TRUE + _FALSE:
        raise BadSetting(f"{name} must be on or off (1/0, true/false, yes/no), got {_shown(text)}")
    return text in _TRUE


def env_url(name: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """A URL with one of `schemes` and a host; None when unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        parts = urlsplit(text)
        ok = parts.scheme.lower() in schemes and bool(parts.hostname) and not _has_control(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        kinds = " or ".join(f"{s}://" for s in schemes)
        raise BadSetting(f"{name} must be a {kinds} URL, got {_shown(text)}")
    return text


PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def check_proxy_settings() -> None:
    """The proxy variables the HTTP client reads: a bad one is our line, not the client's traceback."""
    for name in PROXY_VARIABLES:
        env_url(name, ("http", "https", "socks5", "socks5h"))


def env_secret(name: str) -> str | None:
    """A key or token that goes into an HTTP header: printable ASCII; None when unset or empty."""
    text = os.environ.get(name, "")
    if not text:
        return None
    check_header_value(text, name)
    return text


def check_header_value(text: str, name: str) -> None:
    """A value bound for an HTTP header (never echoed: it may be a secret)."""
    if not all(32 < ord(c) < 127 for c in text.strip()):
        raise BadSetting(f"{name} must be printable ASCII without spaces (an API key or token); it is not")


def env_folder(name: str) -> Path | None:
    """A folder path (which need not exist yet); None when unset or empty."""
    text = os.environ.get(name, "")
    if not text:
        return None
    if _has_control(text):
        raise BadSetting(f"{name} must be a folder path without control characters")
    path = Path(text).expanduser()
    if any(len(os.fsencode(part)) > MAX_PATH_PART_BYTES for part in path.parts):
        raise BadSetting(f"{name} has a part longer than {MAX_PATH_PART_BYTES} bytes")
    if path.exists() and not path.is_dir():
        raise BadSetting(f"{name} must name a folder; {_shown(text)} is a file")
    return path


def env_base_folder(name: str) -> Path | None:
    """An XDG base folder: the spec says a relative one is invalid and to be ignored."""
    text = os.environ.get(name, "")
    if not text or _has_control(text) or not Path(text).is_absolute():
        return None
    return Path(text)
