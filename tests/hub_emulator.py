"""A local stand-in for the Hugging Face hub, so download tests never touch the internet.

It speaks what huggingface-hub 2.4 and our pull call, the way the real hub answers:
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   model info: sha, gated, siblings
                                                          (with blobs: size, blobId, lfs.sha256)
  GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=  file list: size, oid, lfs.oid
  HEAD/GET /{repo}/resolve/{rev}/{path}   small files: 200 with ETag (git blob id),
                                          X-Repo-Commit, Content-Length, Accept-Ranges;
                                          LFS files: 302 to the "CDN" (a second server on another
                                          port, so another origin, as on the real hub) with
                                          X-Linked-Etag, X-Linked-Size, X-Repo-Commit
  HEAD/GET {cdn}/lfs/{sha256}/{name}      the bytes; Range -> 206 + Content-Range, 416 past the end
Errors carry the hub's X-Error-Code: RepoNotFound (401 anonymous, 404 with a token),
GatedRepo (401 without a token, 403 with a wrong one), RevisionNotFound, EntryNotFound.

Faults, set per file name by a test: cut the connection after N bytes, stall after
N bytes, serve one corrupt byte, throttle, ignore Range. Every byte-serving request
is logged with its Range header.

Also here: GGUF helpers that build test repositories from the starter model:
`split_gguf` (real llama.cpp-style split parts, each a GGUF of its own) and
`header_only_gguf` (the starter's metadata without tensors: a small valid GGUF).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from localllm.core.gguf_reader import read_gguf

CHUNK = 256 * 1024


# -- repositories -----------------------------------------------------------------------


@dataclass
class HubFile:
    path: str
    source: Path | bytes
    lfs: bool
    size: int = 0
    sha256: str = ""
    blob_id: str = ""  # git blob id of what git stores: the content, or the LFS pointer

    def __post_init__(self) -> None:
        digest = hashlib.sha256()
        if isinstance(self.source, bytes):
            digest.update(self.source)
            self.size = len(self.source)
        else:
            with open(self.source, "rb") as f:
                while block := f.read(8 << 20):
                    digest.update(block)
            self.size = self.source.stat().st_size
        self.sha256 = digest.hexdigest()
        stored = self.pointer() if self.lfs else self.read(0, self.size)
        self.blob_id = hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    def read(self, start: int, length: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[start : start + length]
        with open(self.source, "rb") as f:
            f.seek(start)
            return f.read(length)


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    token: str | None = None  # set: a gated repository that only this token may download


@dataclass
class Faults:
    """Misbehaviour, keyed by file name (the last path segment)."""

    cut_after: dict[str, list[int]] = field(default_factory=dict)  # one entry used per request
    stall_after: dict[str, list[int]] = field(default_factory=dict)  # send N bytes, then nothing (per request)
    corrupt: set[str] = field(default_factory=set)  # flip one byte in the middle
    throttle_bps: dict[str, float] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)  # answer 200 with the whole file


@dataclass
class Served:
    method: str
    file: str
    range: str | None
    status: int
    authorization: str | None


class HubEmulator:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.by_sha: dict[str, HubFile] = {}
        self.faults = Faults()
        self.served: list[Served] = []  # every request for file bytes
        self.api_calls: list[str] = []
        self.lfs_min_size = 1024  # files at least this big are stored in LFS, like the hub's default rules
        self._stop = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []

    # -- set-up ---------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, Path | bytes], token: str | None = None) -> HubRepo:
        entries = {}
        for path, source in files.items():
            size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
            entry = HubFile(path, source, lfs=size >= self.lfs_min_size)
            entries[path] = entry
            if entry.lfs:
                self.by_sha[entry.sha256] = entry
        commit = hashlib.sha1(repr(sorted((p, f.sha256) for p, f in entries.items())).encode()).hexdigest()
        repo = HubRepo(repo_id, entries, commit, token)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> str:
        emulator = self

        class Handler(_Handler):
            hub = emulator

        for name in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name=f"emulator-{name}", daemon=True).start()
            self._servers.append(server)
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def stop(self) -> None:
        self._stop.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "HubEmulator":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_as_the_hub(self, monkeypatch) -> "HubEmulator":
        """Make this the hub for the test (HF_ENDPOINT, no token, no telemetry), its log and faults cleared."""
        self.reset_log()
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        return self

    # -- what tests look at ---------------------------------------------------------
    def gets(self, file: str) -> list[Served]:
        """Byte-serving GET requests for a file name, in order."""
        return [s for s in self.served if s.file == file and s.method == "GET" and s.status in (200, 206)]

    def reset_log(self) -> None:
        self.served.clear()
        self.api_calls.clear()
        self.faults = Faults()


class _Handler(BaseHTTPRequestHandler):
    hub: HubEmulator
    protocol_version = "HTTP/1.1"
    server_version = "hub-emulator"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- routing --------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        if m := re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path):
            return self._tree(m[1], m[2], m[3] or "", query)
        if m := re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$", path):
            return self._info(m[1], m[2] or "main", query)
        if m := re.match(r"^/lfs/([0-9a-f]{64})/([^/]+)$", path):
            entry = self.hub.by_sha.get(m[1])
            if entry is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            return self._bytes(entry, head, {"ETag": f'"{entry.sha256}"'}, name=m[2])
        if m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
            return self._resolve(m[1], m[2], m[3], head)
        self._error(404, None, "Not found")

    def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            if self.headers.get("Authorization"):
                self._error(404, "RepoNotFound", "Repository not found")
            else:
                self._error(401, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo

    # -- the API --------------------------------------------------------------------
    def _info(self, repo_id: str, revision: str, query: dict) -> None:
        self.hub.api_calls.append(f"info {repo_id}@{revision}")
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for f in repo.files.values():
            s: dict = {"rfilename": f.path}
            if blobs:
                s.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer())}
            siblings.append(s)
        self._json(
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": repo.commit,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z",
                "private": False,
                "disabled": False,
                "gated": "manual" if repo.token else False,
                "downloads": 0,
                "likes": 0,
                "tags": ["gguf"],
                "library_name": "gguf",
                "siblings": siblings,
            }
        )

    def _tree(self, repo_id: str, revision: str, under: str, query: dict) -> None:
        self.hub.api_calls.append(f"tree {repo_id}@{revision}")
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        entries, folders = [], set()
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            for i in range(rest.count("/")):
                folders.add(prefix + "/".join(rest.split("/")[: i + 1]))
            entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer())}
            entries.append(entry)
        dirs = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(folders)]
        self._json(dirs + entries)

    # -- files ----------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, file_path: str, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in."
                return self._error(401, "GatedRepo", msg)
            if auth != f"Bearer {repo.token}":
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the authorized list.")
        entry = repo.files.get(file_path)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist on \"{revision}\"")
        common = {"X-Repo-Commit": repo.commit}
        if entry.lfs:
            self.hub.served.append(Served("HEAD" if head else "GET", Path(file_path).name, None, 302, self.headers.get("Authorization")))
            self.send_response(302)
            for k, v in {
                **common,
                "Location": f"{self.hub.cdn_url}/lfs/{entry.sha256}/{Path(file_path).name}",
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size),
                "ETag": f'"{entry.blob_id}"',
                "Content-Length": "0",
            }.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._bytes(entry, head, {**common, "ETag": f'"{entry.blob_id}"'})

    def _bytes(self, entry: HubFile, head: bool, headers: dict[str, str], name: str | None = None) -> None:
        name = name or Path(entry.path).name
        faults = self.hub.faults
        wanted = self.headers.get("Range")
        start, end, status = 0, entry.size - 1, 200
        if wanted and name not in faults.ignore_range:
            m = re.match(r"^bytes=(\d+)-(\d*)$", wanted.strip())
            if not m or int(m[1]) >= entry.size:
                self.hub.served.append(Served("HEAD" if head else "GET", name, wanted, 416, None))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{entry.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m[1])
            end = min(int(m[2]), entry.size - 1) if m[2] else entry.size - 1
            status = 206
        self.hub.served.append(Served("HEAD" if head else "GET", name, wanted, status, self.headers.get("Authorization")))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if head:
            return
        self._send_body(entry, name, start, end + 1)

    def _send_body(self, entry: HubFile, name: str, start: int, stop: int) -> None:
        faults = self.hub.faults
        cuts = faults.cut_after.get(name)
        cut = cuts.pop(0) if cuts else None
        stalls = faults.stall_after.get(name)
        stall = stalls.pop(0) if stalls else None
        rate = faults.throttle_bps.get(name)
        flip_at = entry.size // 2 if name in faults.corrupt else -1
        sent, pos, next_at = 0, start, time.monotonic()
        try:
            while pos < stop:
                n = min(CHUNK, stop - pos)
                if cut is not None:
                    n = min(n, cut - sent)
                if stall is not None:
                    n = min(n, max(stall - sent, 0))
                if n <= 0:
                    if cut is not None and sent >= cut:
                        self.connection.shutdown(socket.SHUT_RDWR)  # the cut: close mid-body
                        self.close_connection = True
                        return
                    self.wfile.flush()  # the stall: keep the connection open, send nothing
                    self.hub._stop.wait(60)
                    self.close_connection = True
                    return
                data = bytearray(entry.read(pos, n))
                if pos <= flip_at < pos + n:
                    data[flip_at - pos] ^= 0xFF
                self.wfile.write(data)
                sent += n
                pos += n
                if rate:
                    # Paced chunk by chunk: after a stall (a reader starved of CPU, a blocked write) the
                    # rest never arrives in one burst to catch up with the average rate.
                    next_at = max(next_at, time.monotonic()) + n / rate
                    time.sleep(max(0.0, next_at - time.monotonic()))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- replies --------------------------------------------------------------------
    def _json(self, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


# -- GGUF files built from the starter ---------------------------------------------------

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY, _UINT16, _INT32 = 8, 9, 2, 5


def _skip_value(mm, off: int, vtype: int) -> int:
    if vtype in _FIXED:
        return off + _FIXED[vtype]
    if vtype == _STRING:
        return off + 8 + struct.unpack_from("<Q", mm, off)[0]
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", mm, off)
        off += 12
        if etype in _FIXED:
            return off + count * _FIXED[etype]
        for _ in range(count):
            off = _skip_value(mm, off, etype)
        return off
    raise ValueError(f"unknown GGUF value type {vtype}")


def _metadata_bytes(path: Path) -> tuple[int, bytes]:
    """(key count, the raw key/value section) of a GGUF file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert mm[:4] == b"GGUF"
        n_kv = struct.unpack_from("<Q", mm, 16)[0]
        off = 24
        for _ in range(n_kv):
            off += 8 + struct.unpack_from("<Q", mm, off)[0]  # the key
            vtype = struct.unpack_from("<I", mm, off)[0]
            off = _skip_value(mm, off + 4, vtype)
        return n_kv, bytes(mm[24:off])


def _kv(key: str, vtype: int, fmt: str, value) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + struct.pack("<" + fmt, value)


def _pad(n: int, alignment: int = 32) -> int:
    return -n % alignment


def header_only_gguf(src: Path, out: Path) -> Path:
    """The source's metadata with no tensors: a small GGUF our header reader accepts."""
    n_kv, kv = _metadata_bytes(src)
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv
    out.write_bytes(head + b"\0" * _pad(len(head)))
    return out


def split_gguf(src: Path, prefix: Path, parts: int) -> list[Path]:
    """Split a GGUF the way llama.cpp's gguf-split does: PREFIX-0000k-of-0000n.gguf.

    Every part is a GGUF: part 1 carries all metadata, every part carries
    split.no / split.count / split.tensors.count and its own tensors.
    """
    g = read_gguf(src)
    assert g.alignment == 32, "this helper writes the default alignment only"
    n_kv, kv = _metadata_bytes(src)
    # by tensor count, like gguf-split's default --split-max-tensors
    per_part = -(-len(g.tensors) // parts)
    groups = [g.tensors[i : i + per_part] for i in range(0, len(g.tensors), per_part)]
    assert len(groups) == parts, "more parts than the tensors allow"
    paths = []
    with open(src, "rb") as f:
        for i, tensors in enumerate(groups):
            split_kv = (
                _kv("split.no", _UINT16, "H", i)
                + _kv("split.count", _UINT16, "H", parts)
                + _kv("split.tensors.count", _INT32, "i", len(g.tensors))
            )
            infos, offset = b"", 0
            for t in tensors:
                name = t.name.encode()
                infos += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.shape))
                infos += struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.ggml_type, offset)
                offset += t.n_bytes + _pad(t.n_bytes)
            meta = kv if i == 0 else b""
            head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), (n_kv if i == 0 else 0) + 3) + meta + split_kv + infos
            path = prefix.with_name(f"{prefix.name}-{i + 1:05d}-of-{parts:05d}.gguf")
            with open(path, "wb") as out:
                out.write(head + b"\0" * _pad(len(head)))
                for t in tensors:
                    f.seek(t.offset)
                    out.write(f.read(t.n_bytes))
                    out.write(b"\0" * _pad(t.n_bytes))
            paths.append(path)
    return paths
