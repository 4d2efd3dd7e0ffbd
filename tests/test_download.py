"""Pulls against a local hub emulator serving repositories built from the starter model.

Nothing here reaches the internet: HF_ENDPOINT points at tests/hub_emulator.py on
127.0.0.1. The transfers are real HTTP through huggingface-hub's client, into a
real store; the faults (cut connections, stalls, corrupt bytes, a kill -9, a
reboot, a full disk) are the ones users meet.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from localllm.core.config import Paths
from localllm.core.errors import (
    AccessDenied,
    ChecksumMismatch,
    DownloadCancelled,
    ModelNotFound,
    ModelNotInstalled,
    NotEnoughDisk,
)
from localllm.store import download
from localllm.store.progress import ProgressBar
from localllm.store.progress import PullProgress
from localllm.store.pull import pull
from localllm.store.store import ModelStore

sys.path.insert(0, str(Path(__file__).parent))
from hub_emulator import HubEmulator, header_only_gguf, split_gguf  # noqa: E402

STARTER_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
STARTER_SIZE = 253_113_024
TOKEN = "hf_emulator_token"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def emulator(starter_gguf, tiny_gguf, tmp_path_factory):
    """The hub, with repositories made from the starter: two quant names, a split, a tiny GGUF (no tensors), a gated repo."""
    work = tmp_path_factory.mktemp("hub-files")
    parts = split_gguf(starter_gguf, work / "starter-Q4_K_M", 3)
    hub = HubEmulator()
    readme = b"# a model card\n"
    hub.add_repo(
        "test-org/Starter-GGUF",
        {"starter-Q4_K_M.gguf": starter_gguf, "starter-Q8_0.gguf": starter_gguf, "README.md": readme},
    )
    hub.add_repo("test-org/Split-GGUF", {**{p.name: p for p in parts}, "README.md": readme})
    hub.add_repo("test-org/Tiny-GGUF", {"tiny-Q4_K_M.gguf": tiny_gguf, "tiny-Q6_K.gguf": tiny_gguf, "README.md": readme})
    hub.add_repo("test-org/Gated-GGUF", {"tiny-Q4_K_M.gguf": tiny_gguf}, token=TOKEN)
    hub.add_repo(
        "test-org/Tiny-HF",
        {
            "config.json": json.dumps({"model_type": "gemma3_text", "num_hidden_layers": 18}).encode(),
            "tokenizer_config.json": b'{"bos_token": "<bos>"}',
            "model.safetensors": tiny_gguf,  # stands in for weights: only the transfer is tested
            "merges.txt": b"",  # an empty file is a file too
            "README.md": readme,
        },
    )
    hub.built = {"tiny": tiny_gguf, "parts": parts}
    with hub:
        yield hub


@pytest.fixture
def hub(emulator, monkeypatch):
    """The emulator with a clean log and no faults, HF_ENDPOINT pointing at it, no token, fast retries."""
    monkeypatch.delenv(download.FREE_DISK_ENV, raising=False)
    monkeypatch.setattr(download, "RETRY", download.Retry(attempts=4, base_delay_s=0.01, max_delay_s=0.05))
    return emulator.serve_as_the_hub(monkeypatch)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(Paths(tmp_path / "home"))


def cli(home: Path, hub: HubEmulator, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], capture_output=True, text=True, env=cli_env(home, hub), timeout=timeout
    )


def cli_env(home: Path, hub: HubEmulator | None, endpoint: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", download.FREE_DISK_ENV)}
    env.update(LOCALLLM_HOME=str(home), HF_ENDPOINT=endpoint or hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    return env


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".gguf")) if folder.exists() else []


# -- pulling ---------------------------------------------------------------------------


def test_pull_by_quant_installs_a_verified_model_with_monotonic_progress(hub, store):
    events: list[PullProgress] = []
    manifest = pull("hf:test-org/Starter-GGUF:q4_k_m", store=store, progress=events.append)

    assert manifest.name == "hf:test-org/Starter-GGUF:Q4_K_M"
    path = store.model_file(manifest)
    assert path.name == "starter-Q4_K_M.gguf" and path.stat().st_size == STARTER_SIZE
    assert manifest.sha256 == STARTER_SHA == sha256(path)
    assert manifest.source == f"hf:test-org/Starter-GGUF@{hub.repos['test-org/Starter-GGUF'].commit}"
    assert manifest.info["quantization"] == "Q4_K_M" and manifest.info["n_layers"] == 18
    assert leftovers(path.parent) == []  # no .partial, .partial.json or .lock left behind
    assert [m.name for m in store.list()] == [manifest.name]
    assert store.resolve("hf:test-org/Starter-GGUF:Q4_K_M").path == path

    statuses = [e.status for e in events]
    assert statuses[0] == "resolving" and statuses[-1] == "done" and "verifying" in statuses
    done = [e.completed for e in events]
    assert done == sorted(done) and done[-1] == STARTER_SIZE
    assert all(e.total == STARTER_SIZE for e in events if e.status != "resolving")
    assert any(e.speed_bps for e in events if e.status == "downloading")
    assert all(e.file == "starter-Q4_K_M.gguf" for e in events if e.status == "downloading")

    # the same pull again: up to date, no byte fetched
    hub.reset_log()
    assert pull("hf:test-org/Starter-GGUF:Q4_K_M", store=store).sha256 == STARTER_SHA
    assert hub.gets("starter-Q4_K_M.gguf") == []


def test_a_wrong_quant_lists_the_quants_there(hub, store):
    with pytest.raises(ModelNotFound, match=r"test-org/Starter-GGUF has no Q5_K_M GGUF; quants there: Q4_K_M, Q8_0$"):
        pull("hf:test-org/Starter-GGUF:Q5_K_M", store=store)
    assert store.list() == []


def test_missing_repositories_and_files_are_clear(hub, store):
    with pytest.raises(ModelNotFound, match="repository test-org/Nope was not found"):
        pull("hf:test-org/Nope:Q4_K_M", store=store)
    with pytest.raises(ModelNotFound, match="has no file nope.gguf; its GGUF files: tiny-Q4_K_M.gguf, tiny-Q6_K.gguf"):
        pull("hf:test-org/Tiny-GGUF/nope.gguf", store=store)
    with pytest.raises(ModelNotInstalled, match="`localllm pull hf:test-org/Tiny-GGUF:Q4_K_M` downloads it"):
        store.resolve("hf:test-org/Tiny-GGUF:Q4_K_M")


def test_run_pulls_a_split_gguf_first_and_llama_cpp_loads_its_parts(hub, tmp_path, starter_gguf):
    """`run` on a model not installed pulls it (like `ollama run`); all three parts arrive and load."""
    home = tmp_path / "home"
    result = cli(home, hub, "run", "hf:test-org/Split-GGUF:Q4_K_M", "The capital of France is",
                 "--raw", "--temperature", "0", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" the capital of the country of France")
    assert "not installed yet; pulling it first" in result.stderr
    for n in (1, 2, 3):
        assert f"pulling starter-Q4_K_M-0000{n}-of-00003.gguf" in result.stderr

    manifest = ModelStore(Paths(home)).get("hf:test-org/Split-GGUF:Q4_K_M")
    assert [Path(f["path"]).name for f in manifest.files] == [f"starter-Q4_K_M-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    assert Path(manifest.file).name.endswith("-00001-of-00003.gguf")  # llama.cpp opens part 1, finds the rest
    from localllm.core.modelinfo import read_model_info

    whole = read_model_info(starter_gguf)
    assert manifest.info["parameters"] == whole.parameters  # counted over every part
    assert sum(manifest.info["layer_weight_bytes"]) == sum(whole.layer_weight_bytes)
    assert manifest.size == sum(f["size"] for f in manifest.files)


def test_a_snapshot_pulls_config_tokenizer_and_weights(hub, store):
    manifest = pull("hf:test-org/Tiny-HF", store=store)
    folder = store.model_file(manifest).parent
    assert manifest.format == "safetensors" and Path(manifest.file).name == "config.json"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json"]
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 18
    assert (folder / "merges.txt").read_bytes() == b""


def test_a_changed_repository_is_pulled_again_and_replaces_the_old_file(hub, store, tmp_path):
    newer = header_only_gguf(hub.built["parts"][0], tmp_path / "newer.gguf")  # other metadata: other bytes
    hub.add_repo("test-org/Changing-GGUF", {"m-Q4_K_M.gguf": hub.built["tiny"]})
    first = pull("hf:test-org/Changing-GGUF:Q4_K_M", store=store)
    hub.add_repo("test-org/Changing-GGUF", {"m-Q4_K_M.gguf": newer})
    second = pull("hf:test-org/Changing-GGUF:Q4_K_M", store=store)
    assert second.source != first.source and second.sha256 == sha256(newer) != first.sha256
    path = store.model_file(second)
    assert sha256(path) == second.sha256 and leftovers(path.parent) == []
    assert store.resolve("hf:test-org/Changing-GGUF:Q4_K_M").info().size_bytes == newer.stat().st_size


# -- faults ----------------------------------------------------------------------------


def test_a_cut_connection_resumes_with_range_where_the_file_stopped(hub, store):
    hub.faults.cut_after["tiny-Q4_K_M.gguf"] = [1_000_000, 2_500_000]
    manifest = pull("hf:test-org/Tiny-GGUF:Q4_K_M", store=store)
    assert [g.range for g in hub.gets("tiny-Q4_K_M.gguf")] == [None, "bytes=1000000-", "bytes=3500000-"]
    assert sha256(store.model_file(manifest)) == hub.repos["test-org/Tiny-GGUF"].files["tiny-Q4_K_M.gguf"].sha256


def test_bytes_that_do_not_match_the_sha256_are_refused_and_not_listed(hub, store):
    hub.faults.corrupt.add("tiny-Q4_K_M.gguf")
    with pytest.raises(ChecksumMismatch, match="do not match the hub's checksum .* discarded and nothing was installed"):
        pull("hf:test-org/Tiny-GGUF:Q4_K_M", store=store)
    assert store.list() == []
    folder = store.paths.models / "hf-test-org-Tiny-GGUF-Q4_K_M"
    assert [p.name for p in folder.iterdir()] == []  # the bad partial and its record are gone

    hub.faults.corrupt.add("config.json")  # a small file outside LFS: checked by its git blob id
    with pytest.raises(ChecksumMismatch, match="config.json"):
        pull("hf:test-org/Tiny-HF", store=store)
    assert store.list() == []


def test_a_gated_repo_needs_the_right_token(hub, store, monkeypatch):
    with pytest.raises(AccessDenied, match=rf"is gated: accept its licence at {hub.url}/test-org/Gated-GGUF .* set HF_TOKEN"):
        pull("hf:test-org/Gated-GGUF:Q4_K_M", store=store)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(AccessDenied, match="HF_TOKEN"):
        pull("hf:test-org/Gated-GGUF:Q4_K_M", store=store)
    assert [s.status for s in hub.served if s.file == "tiny-Q4_K_M.gguf"] == []  # refused at the hub, before the CDN

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pull("hf:test-org/Gated-GGUF:Q4_K_M", store=store)
    served = [s for s in hub.served if s.file == "tiny-Q4_K_M.gguf"]
    assert served[0].status == 302 and served[0].authorization == f"Bearer {TOKEN}"
    assert served[1].status == 200 and served[1].authorization is None  # the token never leaves the hub


def test_not_enough_disk_is_refused_before_any_byte(hub, store, monkeypatch):
    monkeypatch.setenv(download.FREE_DISK_ENV, str(50_000_000))
    with pytest.raises(NotEnoughDisk, match=r"needs 253.1 MB more, 50.0 MB is free"):
        pull("hf:test-org/Starter-GGUF:Q4_K_M", store=store)
    assert [s for s in hub.served] == []  # not even the redirect was asked for
    assert not (store.paths.models / "hf-test-org-Starter-GGUF-Q4_K_M").exists()


def test_cancel_stops_a_stalled_transfer_and_keeps_the_partial_for_a_resume(hub, store):
    hub.faults.stall_after["tiny-Q4_K_M.gguf"] = [2_000_000]
    cancel = threading.Event()
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(outcome, pull, "hf:test-org/Tiny-GGUF:Q4_K_M", store=store, cancel=cancel))
    worker.start()
    partial = store.paths.models / "hf-test-org-Tiny-GGUF-Q4_K_M" / "tiny-Q4_K_M.gguf.partial"
    _wait_for(lambda: partial.exists() and partial.stat().st_size == 2_000_000)
    started = time.monotonic()
    cancel.set()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - started < 2  # a stalled read does not delay the cancel
    assert isinstance(outcome[0], DownloadCancelled)
    assert partial.stat().st_size == 2_000_000 and store.list() == []

    pull("hf:test-org/Tiny-GGUF:Q4_K_M", store=store)
    assert hub.gets("tiny-Q4_K_M.gguf")[-1].range == "bytes=2000000-"


def test_a_stalled_connection_is_dropped_and_resumed(hub, store, monkeypatch):
    import httpx2

    monkeypatch.setattr(download, "TIMEOUT", httpx2.Timeout(0.5))  # 30 s in real use
    hub.faults.stall_after["tiny-Q4_K_M.gguf"] = [1_000_000]
    manifest = pull("hf:test-org/Tiny-GGUF:Q4_K_M", store=store)
    assert [g.range for g in hub.gets("tiny-Q4_K_M.gguf")] == [None, "bytes=1000000-"]
    assert sha256(store.model_file(manifest)) == hub.repos["test-org/Tiny-GGUF"].files["tiny-Q4_K_M.gguf"].sha256


def test_a_server_that_ignores_range_restarts_the_file_instead_of_appending(hub, store):
    entry = hub.repos["test-org/Tiny-GGUF"].files["tiny-Q4_K_M.gguf"]
    hub.faults.cut_after["tiny-Q4_K_M.gguf"] = [1_500_000]
    hub.faults.ignore_range.add("tiny-Q4_K_M.gguf")
    manifest = pull("hf:test-org/Tiny-GGUF:Q4_K_M", store=store)
    gets = hub.gets("tiny-Q4_K_M.gguf")
    assert [(g.range, g.status) for g in gets] == [(None, 200), ("bytes=1500000-", 200)]
    path = store.model_file(manifest)
    assert path.stat().st_size == entry.size and sha256(path) == entry.sha256


def test_after_a_reboot_only_fsynced_bytes_are_trusted(hub, store):
    """The tail written after the last fsync may be garbage after a power cut: it is cut off, not appended to."""
    entry = hub.repos["test-org/Tiny-GGUF"].files["tiny-Q4_K_M.gguf"]
    folder = store.paths.models / "hf-test-org-Tiny-GGUF-Q4_K_M"
    folder.mkdir(parents=True)
    dest = folder / "tiny-Q4_K_M.gguf"
    download.partial_path(dest).write_bytes(entry.read(0, 3_000_000) + b"\0" * 1_000_000)  # a zero-filled tail
    identity = f"{entry.sha256}:{entry.size}"
    state = {"identity": identity, "url": "", "size": entry.size, "synced": 2_097_152, "boot": "an-earlier-boot"}
    download.state_path(dest).write_text(json.dumps(state))
    manifest = pull("hf:test-org/Tiny-GGUF:Q4_K_M", store=store)
    assert [g.range for g in hub.gets("tiny-Q4_K_M.gguf")] == ["bytes=2097152-"]
    assert sha256(store.model_file(manifest)) == entry.sha256


def test_a_partial_of_another_version_is_discarded(hub, store):
    folder = store.paths.models / "hf-test-org-Tiny-GGUF-Q4_K_M"
    folder.mkdir(parents=True)
    dest = folder / "tiny-Q4_K_M.gguf"
    download.partial_path(dest).write_bytes(b"x" * 1_000_000)
    state = {"identity": "0" * 64 + ":123", "url": "", "size": 123, "synced": 1_000_000, "boot": download.boot_id()}
    download.state_path(dest).write_text(json.dumps(state))
    pull("hf:test-org/Tiny-GGUF:Q4_K_M", store=store)
    assert [g.range for g in hub.gets("tiny-Q4_K_M.gguf")] == [None]


def test_two_pulls_of_one_file_at_once_do_not_corrupt_it(hub, store):
    hub.faults.throttle_bps["tiny-Q4_K_M.gguf"] = 8_000_000  # ~0.8 s, so the two overlap
    results: list = []
    threads = [
        threading.Thread(target=lambda: _capture(results, pull, "hf:test-org/Tiny-GGUF:Q4_K_M", store=ModelStore(store.paths)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and all(r.name == "hf:test-org/Tiny-GGUF:Q4_K_M" for r in results), results
    assert len(hub.gets("tiny-Q4_K_M.gguf")) == 1  # the second waited on the lock and found the file done
    path = store.model_file(results[0])
    assert sha256(path) == hub.repos["test-org/Tiny-GGUF"].files["tiny-Q4_K_M.gguf"].sha256
    assert leftovers(path.parent) == []


def test_kill_9_mid_file_then_pull_again_resumes_at_the_partial_size(hub, tmp_path):
    home = tmp_path / "home"
    hub.faults.throttle_bps["starter-Q8_0.gguf"] = 40_000_000
    ref = "hf:test-org/Starter-GGUF:Q8_0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "pull", ref, "--quiet"],
        env=cli_env(home, hub), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    partial = home / "models" / "hf-test-org-Starter-GGUF-Q8_0" / "starter-Q8_0.gguf.partial"
    try:
        _wait_for(lambda: partial.exists() and partial.stat().st_size > 30_000_000, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    stopped_at = partial.stat().st_size
    assert 30_000_000 < stopped_at < STARTER_SIZE
    assert not (home / "manifests").exists() or list((home / "manifests").iterdir()) == []

    hub.faults.throttle_bps.clear()
    result = cli(home, hub, "pull", ref)
    assert result.returncode == 0, result.stderr
    gets = hub.gets("starter-Q8_0.gguf")
    assert gets[-1].range == f"bytes={stopped_at}-" and gets[-1].status == 206
    final = home / "models" / "hf-test-org-Starter-GGUF-Q8_0" / "starter-Q8_0.gguf"
    assert sha256(final) == STARTER_SHA
    assert "verifying the bytes already on disk" in result.stderr and "ready: hf:test-org/Starter-GGUF:Q8_0" in result.stderr


def _default_sigint() -> None:
    """In the child: SIGINT as a user's shell gives it (a test runner may pass it on ignored or blocked)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_keeps_the_partial_and_says_how_to_resume(hub, tmp_path):
    """The hub sends 1.5 MB and then holds the connection open: Ctrl+C lands mid-transfer, on every machine.

    (This test once relied on a throttle that let a stalled reader catch up in one burst, so on a
    loaded machine the pull could finish before the signal came: exit 0.)
    """
    home = tmp_path / "home"
    hub.faults.stall_after["tiny-Q4_K_M.gguf"] = [1_500_000]
    ref = "hf:test-org/Tiny-GGUF:Q4_K_M"
    proc = subprocess.Popen(
        [sys.executable, "-m", "localllm", "pull", ref], env=cli_env(home, hub),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )
    partial = home / "models" / "hf-test-org-Tiny-GGUF-Q4_K_M" / "tiny-Q4_K_M.gguf.partial"
    try:
        _wait_for(lambda: partial.exists() and partial.stat().st_size == 1_500_000, timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err
    assert f"pull interrupted; the partial download is kept and `localllm pull {ref}` resumes it" in err
    assert partial.stat().st_size == 1_500_000

    assert cli(home, hub, "pull", ref, "--quiet").returncode == 0
    assert hub.gets("tiny-Q4_K_M.gguf")[-1].range == "bytes=1500000-"


# -- the command line --------------------------------------------------------------------


def test_cli_pull_ls_show_rm(hub, tmp_path):
    home = tmp_path / "home"
    result = cli(home, hub, "pull", "hf:test-org/Tiny-GGUF:Q6_K")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "pulling tiny-Q6_K.gguf"
    assert lines[1].startswith("  0% ▕") and lines[-3].startswith("100% ▕") and "6.5 MB/6.5 MB" in lines[-3]
    assert lines[-2:] == ["verifying sha256", "ready: hf:test-org/Tiny-GGUF:Q6_K, 6.5 MB in 1 file, sha256 0ceda0e74112…"]
    assert result.stdout == ""

    rows = json.loads(cli(home, hub, "ls", "--json").stdout)
    assert [(r["name"], r["quantization"], r["size_bytes"]) for r in rows] == [("hf:test-org/Tiny-GGUF:Q6_K", "Q4_K_M", 6_511_168)]
    shown = json.loads(cli(home, hub, "show", "hf:test-org/Tiny-GGUF:Q6_K", "--json").stdout)
    assert shown["architecture"] == "gemma3" and shown["vocab_size"] == 262_144
    assert cli(home, hub, "rm", "hf:test-org/Tiny-GGUF:Q6_K").returncode == 0
    assert json.loads(cli(home, hub, "ls", "--json").stdout) == []
    assert not (home / "models" / "hf-test-org-Tiny-GGUF-Q6_K").exists()


def test_no_network_is_one_line_that_lists_installed_models(tmp_path, starter_gguf):
    store = ModelStore(Paths(tmp_path / "home"))
    target = store.folder_for("mine") / "m.gguf"
    os.link(starter_gguf, target)  # a hard link: the store refuses symbolic links it did not make
    store.add("mine", source="test", file=target, sha256=STARTER_SHA)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = subprocess.run(
        [sys.executable, "-m", "localllm", "pull", "qwen2.5:0.5b"],
        capture_output=True, text=True, env=cli_env(tmp_path / "home", None, endpoint=closed), timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach the model hub at {closed} (")
    assert line.endswith("; installed models: mine")


def test_the_progress_bar_never_goes_backwards():
    import io

    out = io.StringIO()
    bar = ProgressBar(out, tty=True, clock=iter(range(0, 1000, 1)).__next__)
    for done in (0, 500, 300, 900, 1000):
        bar(PullProgress("downloading", "m.gguf", done, 1000, 100.0, (1000 - done) / 100))
    bar(PullProgress("done", None, 1000, 1000, None, None))
    frames = [f.strip() for f in out.getvalue().split("\r") if "%" in f]
    percents = [int(f.split("%")[0]) for f in frames]
    assert percents == sorted(percents) and percents[-1] == 100 and 30 not in percents
    assert "5s left" in out.getvalue()


def test_pull_starter_reports_progress_too(store):
    events: list[PullProgress] = []
    manifest = pull("starter", store=store, progress=events.append)
    assert manifest.sha256 == STARTER_SHA
    assert [e.status for e in events][0] == "resolving" and events[-1].status == "done"
    assert events[-1].completed == events[-1].total == STARTER_SIZE
    assert any(e.status == "downloading" and 0 < e.completed < STARTER_SIZE for e in events)


def test_the_emulator_speaks_what_huggingface_hub_calls(hub, tmp_path):
    """huggingface-hub's own client works against the emulator, so the emulator is a fair stand-in."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    api = HfApi(endpoint=hub.url)
    tree = {f.path: f for f in api.list_repo_tree("test-org/Tiny-GGUF", recursive=True)}
    entry = hub.repos["test-org/Tiny-GGUF"].files["tiny-Q4_K_M.gguf"]
    assert tree["tiny-Q4_K_M.gguf"].lfs.sha256 == entry.sha256 and tree["README.md"].lfs is None
    meta = get_hf_file_metadata(hf_hub_url("test-org/Tiny-GGUF", "tiny-Q4_K_M.gguf", endpoint=hub.url))
    assert (meta.commit_hash, meta.etag, meta.size) == (hub.repos["test-org/Tiny-GGUF"].commit, entry.sha256, entry.size)
    got = hf_hub_download("test-org/Tiny-GGUF", "tiny-Q4_K_M.gguf", endpoint=hub.url, cache_dir=tmp_path / "hf")
    assert sha256(Path(got)) == entry.sha256


# -- helpers ---------------------------------------------------------------------------


def _capture(into: list, fn, *args, **kwargs) -> None:
    try:
        into.append(fn(*args, **kwargs))
    except BaseException as exc:  # handed to the test thread
        into.append(exc)


def _wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)
