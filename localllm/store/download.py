"""Our own resumable transfer of one file into the store. It never loses or corrupts a byte.

For a file `<dest>` it keeps, beside it:
    <dest>.partial        the bytes so far (only ever appended in order)
    <dest>.partial.json   what the partial is (the expected hash and size) and how much
                          of it has reached the disk for sure (fsync'ed), with the boot id
    <dest>.lock           held while a process works on this file

Resuming: after a cut connection, a Ctrl-C or a `kill -9` the bytes in the
partial are sound (the kernel keeps what a killed process wrote), so the next
request asks for `Range: bytes=<partial size>-`. After a reboot (another boot
id) the tail past the last fsync may be garbage, so the partial is cut back
to the fsync'ed length first. A partial for another version of the file (a
different hash) is discarded. A server that ignores Range (200 instead of 206)
restarts the file from byte 0 instead of appending a second copy.

Verifying: the sha256 (and the git blob id for small non-LFS files) is
computed while the bytes stream in, continuing over the resumed prefix, and
compared with the hub's before an atomic rename onto `<dest>`. A mismatch
discards the partial: nothing half-right is ever installed.

Retries: a failed attempt that brought no new bytes waits 1, 2, 4... seconds
(with jitter, at most 30); an attempt that made progress resets the count.
A stall longer than the read timeout counts as a failed attempt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx2

from localllm.core.atomic import _fsync_dir, write_json_atomic
from localllm.core.env_vars import env_int
from localllm.core.errors import ChecksumMismatch, DownloadCancelled, DownloadFailed, NotEnoughDisk, UnsafeStorePath
from localllm.store.own_files import is_own_file, not_a_link, open_fd, open_file
from localllm.core.units import human_bytes

SYNC_EVERY_BYTES = 64 << 20  # fsync and record progress this often
TIMEOUT = httpx2.Timeout(connect=15.0, read=30.0, write=30.0, pool=30.0)
FREE_DISK_ENV = "LOCALLLM_DISK_FREE_BYTES"  # pretend this many bytes are free (tests, dry runs)
DISK_RESERVE_BYTES = 100_000_000  # never fill a disk to the last byte
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class Retry:
    attempts: int = 6  # consecutive attempts without a new byte before giving up
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, failures: int) -> float:
        raw = min(self.max_delay_s, self.base_delay_s * 2 ** (failures - 1))
        return raw * (0.5 + random.random() / 2)


RETRY = Retry()


@dataclass(frozen=True)
class FileJob:
    """One file to fetch: where from, where to, and what it must hash to."""

    url: str
    dest: Path
    size: int
    sha256: str | None = None  # the hub's LFS sha256
    blob_id: str | None = None  # git blob id, checked for files outside LFS
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """What the partial must be a prefix of; a partial of anything else is discarded."""
        return f"{self.sha256 or self.blob_id or self.url}:{self.size}"


class ServerRefused(DownloadFailed):
    """The server answered with an HTTP error that retrying will not fix (401, 403, 404...)."""

    def __init__(self, status: int, error_code: str | None, url: str):
        super().__init__(f"the server refused {url} (HTTP {status})")
        self.status = status
        self.error_code = error_code


class _Retryable(Exception):
    """A failure worth another attempt: a cut connection, a timeout, a 5xx."""


# -- paths and disk ---------------------------------------------------------------------


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def state_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial.json")


def lock_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".lock")


def boot_id() -> str:
    """Changes on every boot: tells a reboot (unsynced tail unsafe) from a killed process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import psutil

        return f"boot-time-{int(psutil.boot_time())}"


def free_bytes(where: Path) -> int:
    """Free space on the disk holding `where`; `LOCALLLM_DISK_FREE_BYTES` overrides it."""
    override = env_int(FREE_DISK_ENV)
    if override is not None:
        return override
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(where: Path, needed: int) -> None:
    """Refuse, before any byte is written, a pull that would not fit."""
    if needed <= 0:
        return
    free = free_bytes(where)
    if needed + DISK_RESERVE_BYTES > free:
        raise NotEnoughDisk(
            f"not enough disk space in {where}: this pull needs {human_bytes(needed)} more, "
            f"{human_bytes(free)} is free and {human_bytes(DISK_RESERVE_BYTES)} is kept spare"
        )


def bytes_on_disk(job: FileJob) -> int:
    """Bytes of this job already present: the whole file, or a partial that a resume will keep."""
    if is_own_file(job.dest) and job.dest.stat().st_size == job.size:
        return job.size
    return _trusted_partial(job)[0]


def _trusted_partial(job: FileJob) -> tuple[int, int]:
    """(bytes of the partial file a resume may keep, of which surely on disk).

    Nothing of a partial without a record or recorded for another version;
    after a reboot, only what was fsync'ed before it.
    """
    state = _read_state(job.dest)
    partial = partial_path(job.dest)
    if state is None or state.get("identity") != job.identity or not is_own_file(partial):
        return 0, 0
    length = partial.stat().st_size
    synced = int(state.get("synced", 0))
    if state.get("boot") != boot_id():
        length = min(length, synced)
    if length > job.size:
        return 0, 0
    return length, min(length, synced)


# -- the transfer -----------------------------------------------------------------------


def fetch(
    job: FileJob,
    *,
    progress: Callable[[int], None] | None = None,
    status: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    client: httpx2.Client | None = None,
    retry: Retry | None = None,
) -> str:
    """Bring `job.dest` onto disk, complete and verified; return its sha256.

    progress(n) reports this file's bytes on disk (resumed bytes included);
    status("verifying") is said while hashing bytes that did not stream in now.
    """
    job.dest.parent.mkdir(parents=True, exist_ok=True)
    not_a_link(job.dest.parent, "model folder")
    own_client = client is None
    client = client or httpx2.Client()
    try:
        with FileLock(lock_path(job.dest), cancel):
            return _Transfer(job, progress, status, cancel).run(client, retry or RETRY)
    finally:
        if own_client:
            client.close()


class _Transfer:
    def __init__(self, job: FileJob, progress, status, cancel) -> None:
        self.job = job
        self.partial = partial_path(job.dest)
        self.progress = progress or (lambda n: None)
        self.status = status or (lambda s: None)
        self.cancel = cancel
        self.offset = 0
        self.synced = 0
        self._new_hashers()

    def _new_hashers(self) -> None:
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(b"blob %d\0" % self.job.size) if self.job.blob_id and not self.job.sha256 else None

    def _hash(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    # -- the whole file ---------------------------------------------------------------
    def run(self, client: httpx2.Client, retry: Retry) -> str:
        done = self._already_complete()
        if done is not None:
            return done
        self._resume()
        failures = 0
        while self.offset < self.job.size:
            if self.cancelled():
                raise DownloadCancelled(f"pull cancelled; {self.job.dest.name} is kept for a resume")
            before = self.offset
            try:
                self._attempt(client)
                continue
            except _Retryable as exc:
                failures = 0 if self.offset > before else failures + 1
                if failures >= retry.attempts:
                    raise DownloadFailed(
                        f"download of {self.job.dest.name} failed {failures} times in a row ({exc}); "
                        "the partial file is kept and the same pull resumes it"
                    ) from None
                self._sleep(retry.delay(max(failures, 1)) if failures else 0.2)
        return self._finish()

    def _sleep(self, seconds: float) -> None:
        if self.cancel is not None:
            self.cancel.wait(seconds)
        else:
            time.sleep(seconds)

    def _already_complete(self) -> str | None:
        """A finished file (another pull's, or from before a crash) counts only if it verifies.

        Another version of the file stays in place, still usable, until the new
        one replaces it in one rename.
        """
        dest = self.job.dest
        not_a_link(dest, "model file")
        if not dest.is_file() or dest.stat().st_size != self.job.size:
            return None
        self.status("verifying")
        self._hash_file(dest, self.job.size)
        if not self._matches():
            self._new_hashers()
            return None
        self.partial.unlink(missing_ok=True)  # a leftover of an earlier try
        state_path(dest).unlink(missing_ok=True)
        self.progress(self.job.size)
        return self.sha256.hexdigest()

    def _resume(self) -> None:
        """Keep the trustworthy prefix of a partial file (cut the rest off) and hash it."""
        length, synced = _trusted_partial(self.job)
        self._write_state(synced)  # recorded before the partial is touched
        with open_file(self.partial, "w+b", "partial download") as f:
            f.truncate(length)
        self.offset = length
        if length:
            self.status("verifying")
            self._hash_file(self.partial, length)
        self.progress(self.offset)

    def _hash_file(self, path: Path, length: int) -> None:
        left = length
        with open_file(path, "rb", "model file") as f:
            while left > 0:
                if self.cancelled():
                    raise DownloadCancelled("pull cancelled")
                block = f.read(min(left, 4 << 20))
                if not block:
                    break
                self._hash(block)
                left -= len(block)

    # -- one request ------------------------------------------------------------------
    def _attempt(self, client: httpx2.Client) -> None:
        headers = dict(self.job.headers)
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        finished = threading.Event()
        try:
            with client.stream("GET", self.job.url, headers=headers, timeout=TIMEOUT, follow_redirects=True) as r:
                self._check_response(r)
                if self.cancel is not None:
                    _close_when_cancelled(self.cancel, r, finished)
                self._receive(r)
        except httpx2.TransportError as exc:
            if self.cancelled():
                raise DownloadCancelled(f"pull cancelled; {self.job.dest.name} is kept for a resume") from None
            raise _Retryable(str(exc) or type(exc).__name__) from None
        except (OSError, ValueError, RuntimeError) as exc:
            # a stream closed under us by a cancel shows up as one of these
            if self.cancelled():
                raise DownloadCancelled(f"pull cancelled; {self.job.dest.name} is kept for a resume") from None
            if isinstance(exc, OSError):
                raise DownloadFailed(f"cannot write {self.partial}: {exc.strerror or exc}") from None
            raise
        finally:
            finished.set()
        if self.offset < self.job.size:
            raise _Retryable(f"the connection closed at byte {self.offset} of {self.job.size}")

    def _check_response(self, r: httpx2.Response) -> None:
        code = r.status_code
        if code == 200:
            if self.offset:  # the server ignored Range: start over rather than append a second copy
                self.offset = 0
                self._new_hashers()
                self._write_state(0)
            length = r.headers.get("Content-Length")
            if length is not None and int(length) != self.job.size:
                raise DownloadFailed(
                    f"the server sends {length} bytes for {self.job.dest.name} but the hub lists {self.job.size}"
                )
            return
        if code == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if not m or int(m[1]) != self.offset or (m[3] != "*" and int(m[3]) != self.job.size):
                # a range we did not ask for: restart the file cleanly on the next attempt
                self.offset = 0
                self._new_hashers()
                self._write_state(0)
                raise _Retryable(f"the server answered a resume with Content-Range {r.headers.get('Content-Range')!r}")
            return
        if code == 416:  # our partial and the server disagree on the file: start it over
            self.offset = 0
            self._new_hashers()
            self._write_state(0)
            raise _Retryable("HTTP 416: the server cannot serve the resume point")
        if code == 429 or code >= 500:
            raise _Retryable(f"HTTP {code}")
        raise ServerRefused(code, r.headers.get("X-Error-Code"), str(r.request.url))

    def _receive(self, r: httpx2.Response) -> None:
        with open_file(self.partial, "w+b", "partial download", buffering=0) as f:
            f.seek(self.offset)
            f.truncate(self.offset)
            for piece in r.iter_raw():
                if self.cancelled():
                    raise DownloadCancelled(f"pull cancelled; {self.job.dest.name} is kept for a resume")
                if self.offset + len(piece) > self.job.size:
                    raise DownloadFailed(f"the server sent more than the {self.job.size} bytes of {self.job.dest.name}")
                view = memoryview(piece)
                while view:
                    written = f.write(view)
                    view = view[written:]
                self._hash(piece)
                self.offset += len(piece)
                self.progress(self.offset)
                if self.offset - self.synced >= SYNC_EVERY_BYTES:
                    os.fsync(f.fileno())
                    self._write_state(self.offset)

    # -- the end ----------------------------------------------------------------------
    def _matches(self) -> bool:
        if self.job.sha256 and self.sha256.hexdigest() != self.job.sha256.lower():
            return False
        if self.sha1 is not None and self.sha1.hexdigest() != self.job.blob_id:
            return False
        return True

    def _finish(self) -> str:
        self.status("verifying")
        if not self._matches():
            got = self.sha256.hexdigest()
            expected = self.job.sha256 or f"git blob {self.job.blob_id}"
            self.partial.unlink(missing_ok=True)
            state_path(self.job.dest).unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{self.job.dest.name}: the downloaded bytes do not match the hub's checksum "
                f"(expected {expected[:16]}…, got sha256 {got[:16]}…); they were discarded and "
                "nothing was installed"
            )
        with open_file(self.partial, "rb", "partial download") as f:
            os.fsync(f.fileno())
        os.replace(self.partial, self.job.dest)
        _fsync_dir(self.job.dest.parent)
        state_path(self.job.dest).unlink(missing_ok=True)
        return self.sha256.hexdigest()

    def _write_state(self, synced: int) -> None:
        self.synced = synced
        write_json_atomic(
            state_path(self.job.dest),
            {
                "identity": self.job.identity,
                "url": self.job.url,
                "size": self.job.size,
                "synced": synced,
                "boot": boot_id(),
            },
        )


def _read_state(dest: Path) -> dict | None:
    try:
        with open_file(state_path(dest), "rb", "download record") as f:
            state = json.loads(f.read())
        return state if isinstance(state, dict) else None
    except (OSError, ValueError, UnsafeStorePath):
        return None  # no record (a planted link counts as none): the partial is not trusted


def _close_when_cancelled(cancel: threading.Event, response: httpx2.Response, finished: threading.Event) -> None:
    """Shut the connection's socket as soon as `cancel` is set, so even a stalled read ends at once.

    (Closing the response from another thread would wait for the read to finish;
    a socket shutdown wakes the blocked receive with end-of-stream.)
    """
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None

    def watch() -> None:
        while not finished.is_set():
            if cancel.wait(0.1):
                if not finished.is_set():
                    try:
                        if sock is not None:
                            sock.shutdown(socket.SHUT_RDWR)
                        else:
                            response.close()
                    except OSError:
                        pass  # already closed
                return

    threading.Thread(target=watch, name="pull-cancel-watch", daemon=True).start()


# -- one process at a time per file -----------------------------------------------------


class FileLock:
    """An exclusive lock on a lock file, so two pulls of one file never write it at once.

    The second pull waits (a cancel still stops it), then usually finds the
    file complete. The holder removes the lock file while still holding it;
    a waiter that had opened the removed file sees its inode is gone and
    starts over on the new one, so no two processes ever hold "the" lock.
    """

    def __init__(self, path: Path, cancel: threading.Event | None = None, poll_s: float = 0.1) -> None:
        self.path = path
        self.cancel = cancel
        self.poll_s = poll_s
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        while True:
            fd = open_fd(self.path, os.O_RDWR | os.O_CREAT, "lock file")
            try:
                while not _try_lock(fd):
                    if self.cancel is not None and self.cancel.wait(self.poll_s):
                        raise DownloadCancelled("pull cancelled while another pull of the same file was running")
                    if self.cancel is None:
                        time.sleep(self.poll_s)
                if _same_file(fd, self.path):
                    self.fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def __exit__(self, *exc) -> None:
        assert self.fd is not None
        if os.name != "nt":  # Windows cannot remove an open file; the empty lock file stays
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        _unlock(self.fd)
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
