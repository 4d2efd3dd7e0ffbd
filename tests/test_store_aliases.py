"""The store's second names, uploaded blobs and per-model settings (Ollama's copy, blobs and create)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from localllm.core.config import Paths
from localllm.core.errors import BadModelFile, BadRequest, ModelNotFound
from localllm.store.blobs import BlobStore, parse_digest
from localllm.store.store import ModelStore


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(Paths(tmp_path))


def install(store: ModelStore, name: str, gguf: Path) -> Path:
    target = store.folder_for(name) / gguf.name
    os.link(gguf, target)
    store.add(name, source="test", file=target, sha256="0" * 64)
    return target


def test_copy_is_a_second_manifest_on_the_same_file(store, tiny_gguf):
    weights = install(store, "orig", tiny_gguf)
    copy = store.copy("orig", "twin")
    assert copy.file == store.get("orig").file and store.resolve("twin").path == weights
    assert [m.name for m in store.list()] == ["orig", "twin"]
    assert not (store.paths.models / "twin").exists()  # no copy of the weights


def test_rm_keeps_files_another_name_uses(store, tiny_gguf):
    weights = install(store, "orig", tiny_gguf)
    store.copy("orig", "twin")
    store.remove("orig")
    assert weights.is_file() and store.resolve("twin").path == weights
    store.remove("twin")  # the last name: now the file and its folder go
    assert not weights.exists() and not weights.parent.exists()
    assert store.list() == []


def test_rm_of_the_copy_keeps_the_original(store, tiny_gguf):
    weights = install(store, "orig", tiny_gguf)
    store.copy("orig", "twin")
    store.remove("twin")
    assert weights.is_file() and store.get("twin") is None and store.get("orig") is not None


def test_copy_refuses_unknown_source_bad_and_colliding_names(store, tiny_gguf):
    install(store, "a:b", tiny_gguf)
    with pytest.raises(ModelNotFound):
        store.copy("nope", "x")
    with pytest.raises(BadRequest):
        store.copy("a:b", "bad\x00name")
    with pytest.raises(BadRequest, match="too close"):
        store.copy("a:b", "a-b")  # the same manifest file name as a:b
    with pytest.raises(BadRequest, match="file name"):
        store.copy("a:b", "x" * 252)  # a valid name, but its manifest's file name would pass the limit
    assert store.get("a:b") is not None


def test_copy_onto_an_installed_name_replaces_it_and_frees_its_files(store, tiny_gguf, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_gguf.read_bytes())
    install(store, "orig", tiny_gguf)
    old = install(store, "target", other)
    store.copy("orig", "target")
    assert store.get("target").file == store.get("orig").file
    assert not old.exists()


def test_overrides_reach_the_model_info(store, tiny_gguf):
    install(store, "orig", tiny_gguf)
    store.copy("orig", "pirate", system="Talk like a pirate.", template="{{ messages[0]['content'] }}", parameters={"temperature": 0})
    info = store.resolve("pirate").info()
    assert info.system_prompt == "Talk like a pirate." and info.chat_template == "{{ messages[0]['content'] }}"
    assert store.get("pirate").parameters == {"temperature": 0}
    derived = store.copy("pirate", "pirate2", parameters={"num_predict": 5})
    assert derived.parameters == {"temperature": 0, "num_predict": 5} and derived.system == "Talk like a pirate."
    assert store.resolve("orig").info().system_prompt is None  # the original is untouched


def test_recreating_a_model_in_place_keeps_its_files(store, tiny_gguf):
    weights = install(store, "orig", tiny_gguf)
    store.copy("orig", "orig", system="new")
    assert weights.is_file() and store.get("orig").system == "new"


def test_digests_are_checked_as_text():
    hex_digest = "ab" * 32
    assert parse_digest(f"sha256:{hex_digest}") == hex_digest == parse_digest(f"sha256-{hex_digest}")
    for bad in ("sha256:" + "AB" * 32, "sha256:abc", "md5:" + hex_digest, "sha256:../" + hex_digest[3:]):
        with pytest.raises(BadRequest):
            parse_digest(bad)


def test_upload_checks_the_digest_and_leaves_nothing_on_a_mismatch(store):
    blobs = BlobStore(store.paths)
    data = b"some bytes" * 1000
    good = hashlib.sha256(data).hexdigest()
    upload = blobs.upload(good)
    upload.write(data[:10])
    upload.write(data[10:])
    upload.finish()
    assert blobs.has(good) and blobs.path(good).read_bytes() == data
    wrong = "0" * 64
    upload = blobs.upload(wrong)
    upload.write(data)
    with pytest.raises(BadRequest, match="sha256"):
        upload.finish()
    assert not blobs.has(wrong)
    assert sorted(p.name for p in blobs.folder.iterdir()) == [f"sha256-{good}"]  # no partial file left


def test_install_moves_the_blob_into_a_model(store, tiny_gguf):
    blobs = BlobStore(store.paths)
    data = tiny_gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    upload = blobs.upload(digest)
    upload.write(data)
    upload.finish()
    manifest = blobs.install(store, "uploaded", digest, "tiny.gguf", system="hi")
    assert not blobs.has(digest)  # moved, not copied
    resolved = store.resolve("uploaded")
    assert resolved.path.read_bytes() == data and manifest.sha256 == digest
    assert resolved.info().system_prompt == "hi" and resolved.info().architecture == "gemma3"
    store.remove("uploaded")
    assert not resolved.path.exists()


def test_install_refuses_missing_blobs_and_non_models(store):
    blobs = BlobStore(store.paths)
    with pytest.raises(BadRequest, match="not been uploaded"):
        blobs.install(store, "x", "1" * 64, "x.gguf")
    data = b"not a gguf"
    digest = hashlib.sha256(data).hexdigest()
    upload = blobs.upload(digest)
    upload.write(data)
    upload.finish()
    with pytest.raises(BadModelFile):
        blobs.install(store, "x", digest, "x.gguf")
    assert blobs.has(digest) and store.get("x") is None
