"""Where localllm keeps its files, and the settings that environment variables override.

`LOCALLLM_HOME` wins; otherwise the XDG data home (`$XDG_DATA_HOME` or
`~/.local/share`) plus `/localllm`. Nothing is ever written to `~/.cache`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def home_dir() -> Path:
    explicit = os.environ.get("LOCALLLM_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "localllm"


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def models(self) -> Path:
        """Model files, one folder per installed model."""
        return self.home / "models"

    @property
    def manifests(self) -> Path:
        """One JSON manifest per installed model."""
        return self.home / "manifests"


def paths() -> Paths:
    return Paths(home_dir())
