"""Where localllm keeps its files, and the settings that environment variables override.

`LOCALLLM_HOME` wins; otherwise the XDG data home (`$XDG_DATA_HOME` or
`~/.local/share`) plus `/localllm`. Nothing is ever written to `~/.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localllm.core.env_vars import env_base_folder, env_folder


def home_dir() -> Path:
    explicit = env_folder("LOCALLLM_HOME")
    if explicit is not None:
        return explicit
    xdg = env_base_folder("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return xdg / "localllm"


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
