"""The store touches only its own files: planted symbolic links, long and odd names.

Each planted link points at a sentinel outside the store that must stay
byte-for-byte untouched; every refusal is one line and exit code 1 from the
real `localllm` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.core.config import Paths
from localllm.core.errors import BadRequest, ModelNotFound, UnsafeStorePath
from localllm.store.store import ModelStore, slug

sys.path.insert(0, str(Path(__file__).parent))
from hub_emulator import HubEmulator  # noqa: E402

REPO = "test-org/Tiny-GGUF"
REF = f"hf:{REPO}:Q4_K_M"
FILE = "tiny-Q4_K_M.gguf"
SENTINEL_TEXT = b"precious bytes outside the store\n"


@pytest.fixture(scope="module")
def hub(tiny_gguf):
    """A hub serving one small GGUF (the starter's header, no tensors)."""
    emulator = HubEmulator()
    emulator.add_repo(REPO, {FILE: tiny_gguf, "README.md": b"# card\n"})
    with emulator:
        yield emulator


def localllm(home: Path, *args: str, hub: HubEmulator | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "LOCALLLM_DISK_FREE_BYTES")}
    env.update(LOCALLLM_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], capture_output=True, text=True, env=env, timeout=180
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "unexpected" not in lines[0] and "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def sentinel(tmp_path) -> Path:
    path = tmp_path / "outside" / "sentinel.txt"
    path.parent.mkdir()
    path.write_bytes(SENTINEL_TEXT)
    return path


def untouched(sentinel: Path, before: os.stat_result) -> bool:
    after = sentinel.stat()
    return sentinel.read_bytes() == SENTINEL_TEXT and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def pull_folder(home: Path) -> Path:
    return home / "models" / slug(REF)


# --- pulls: partial, lock, model file and model folder ---------------------------------


@pytest.mark.parametrize("planted", [f"{FILE}.partial", f"{FILE}.lock", FILE])
def test_pull_refuses_a_planted_link_and_leaves_its_target_alone(planted, hub, tmp_path, sentinel):
    home = tmp_path / "home"
    folder = pull_folder(home)
    folder.mkdir(parents=True)
    (folder / planted).symlink_to(sentinel)
    before = sentinel.stat()
    line = one_line_error(localllm(home, "pull", REF, "--quiet", hub=hub))
    assert "symbolic link" in line and planted in line
    assert untouched(sentinel, before)
    assert (folder / planted).is_symlink()  # left for the user to look at
    assert not (home / "manifests" / f"{slug(REF)}.json").exists()


def test_pull_refuses_a_planted_model_folder_link(hub, tmp_path, sentinel):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    pull_folder(home).symlink_to(sentinel.parent, target_is_directory=True)
    line = one_line_error(localllm(home, "pull", REF, "--quiet", hub=hub))
    assert "symbolic link" in line and "model folder" in line
    assert sorted(p.name for p in sentinel.parent.iterdir()) == ["sentinel.txt"]


def test_a_clean_pull_still_works(hub, tmp_path):
    home = tmp_path / "home"
    result = localllm(home, "pull", REF, "--quiet", hub=hub)
    assert result.returncode == 0, result.stderr
    assert (pull_folder(home) / FILE).is_file()


# --- installed models: resolve and rm --------------------------------------------------


@pytest.fixture
def installed(tmp_path, starter_gguf) -> ModelStore:
    """A store with `mine` installed (a hard link of the starter)."""
    store = ModelStore(Paths(tmp_path / "home"))
    target = store.folder_for("mine") / "m.gguf"
    os.link(starter_gguf, target)
    store.add("mine", source="test", file=target, sha256="0" * 64)
    return store


def test_rm_with_a_planted_model_file_link_keeps_the_manifest(installed, sentinel):
    target = installed.model_file(installed.get("mine"))
    target.unlink()
    target.symlink_to(sentinel)
    before = sentinel.stat()
    line = one_line_error(localllm(installed.paths.home, "rm", "mine"))
    assert "symbolic link" in line and "m.gguf" in line
    assert installed.get("mine") is not None and untouched(sentinel, before)
    with pytest.raises(UnsafeStorePath):
        installed.resolve("mine")


def test_rm_with_a_planted_model_folder_link_keeps_the_manifest(installed, sentinel):
    folder = installed.model_file(installed.get("mine")).parent
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    folder.symlink_to(sentinel.parent, target_is_directory=True)
    before = sentinel.stat()
    line = one_line_error(localllm(installed.paths.home, "rm", "mine"))
    assert "symbolic link" in line and "model folder" in line
    assert installed.get("mine") is not None and untouched(sentinel, before)
    assert one_line_error(localllm(installed.paths.home, "show", "mine")).endswith("(remove it yourself)")


def test_a_planted_manifest_link_is_refused(installed, sentinel):
    planted = installed.manifest_path("other")
    planted.symlink_to(sentinel)
    with pytest.raises(UnsafeStorePath, match="symbolic link"):
        installed.get("other")
    assert [m.name for m in installed.list()] == ["mine"]  # skipped, like a damaged one


def test_rm_still_removes_a_clean_model(installed):
    folder = installed.model_file(installed.get("mine")).parent
    result = localllm(installed.paths.home, "rm", "mine")
    assert result.returncode == 0, result.stderr
    assert installed.get("mine") is None and not folder.exists()


# --- names ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("rm",), ("show",), ("pull", "--quiet")])
def test_long_names_are_one_clear_line(command, tmp_path):
    line = one_line_error(localllm(tmp_path / "home", *command, "m" * 300))
    assert "255 bytes" in line


def test_control_characters_are_one_clear_line(tmp_path):
    assert "control characters" in one_line_error(localllm(tmp_path / "home", "rm", "bad\x01name"))
    assert "control characters" in one_line_error(localllm(tmp_path / "home", "show", "bad\x1bname"))


@pytest.mark.parametrize("name", ["", "m" * 256, "a\x00b", "\ud800", "tab\there"])
def test_store_names_are_checked_before_the_file_system(name, tmp_path):
    store = ModelStore(Paths(tmp_path / "home"))
    for call in (store.get, store.remove, store.resolve, store.folder_for):
        with pytest.raises(BadRequest):
            call(name)
    assert not (tmp_path / "home").exists()


def test_a_store_name_never_probes_paths_outside_the_store(tmp_path, monkeypatch, starter_gguf):
    """Without allow_paths (the server's names), an existing file answers exactly as a missing one."""
    monkeypatch.chdir(tmp_path)
    os.link(starter_gguf, tmp_path / "here.gguf")
    (tmp_path / "folder").mkdir()
    store = ModelStore(Paths(tmp_path / "home"))
    for name in ("here.gguf", "folder", "../" * 5 + "etc/passwd", "/etc/passwd", "~root"):
        with pytest.raises(ModelNotFound) as found:
            store.resolve(name)
        assert str(found.value) == f"model '{name}' not found; `localllm ls` lists installed models"
    # the command line may still name a file
    assert store.resolve("here.gguf", allow_paths=True).path == (tmp_path / "here.gguf").resolve()
