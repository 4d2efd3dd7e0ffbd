"""Uploaded files, named by their sha256, waiting to become models (Ollama's /api/blobs).

An upload streams into a temporary file in `blobs/` while its sha256 is computed;
only a file whose digest matches the one it was sent for is renamed to
`blobs/sha256-<hex>`, so a blob that exists is always complete and checked. A
mismatch or a broken upload leaves nothing behind. `install` turns a blob into an
installed model by renaming it into the model's folder: the weights are never copied.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from localllm.core.atomic import _fsync_dir as fsync_dir
from localllm.core.config import Paths, paths
from localllm.core.errors import BadRequest
from localllm.core.modelinfo import read_model_info
from localllm.store.own_files import is_own_file, not_a_link
from localllm.store.store import Manifest, ModelStore

_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")


def parse_digest(text: str) -> str:
    """The hex of a digest written `sha256:<64 hex>` (Ollama's form) or `sha256-<64 hex>`; else BadRequest."""
    match = _DIGEST.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise BadRequest(f"'{str(text)[:80]}' is not a digest; expected sha256:<64 lowercase hex digits>")
    return match.group(1)


class BlobUpload:
    """One upload in progress: `write` chunks, then `finish` (checked, renamed into place) or `abort`."""

    def __init__(self, folder: Path, target: Path, expected_hex: str) -> None:
        self.target = target
        self.expected_hex = expected_hex
        self.size = 0
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=folder)
        self._partial = Path(name)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> Path:
        """Check the digest and move the file into place; BadRequest (and nothing kept) on a mismatch."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            actual = self._hash.hexdigest()
            if actual != self.expected_hex:
                raise BadRequest(f"the upload's sha256 is {actual}, not {self.expected_hex} as its digest says; nothing was kept")
            os.replace(self._partial, self.target)
            fsync_dir(self.target.parent)
            return self.target
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the partial file (idempotent; a finished upload has nothing left to drop)."""
        if not self._file.closed:
            self._file.close()
        self._partial.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, where: Paths | None = None) -> None:
        self.paths = where or paths()
        self.folder = self.paths.home / "blobs"

    def path(self, hex_digest: str) -> Path:
        return self.folder / f"sha256-{hex_digest}"

    def has(self, hex_digest: str) -> bool:
        """Whether a complete, checked blob with this digest is here (a link planted here does not count)."""
        return is_own_file(self.path(hex_digest))

    def upload(self, hex_digest: str) -> BlobUpload:
        self.folder.mkdir(parents=True, exist_ok=True)
        not_a_link(self.folder, "blobs folder")
        return BlobUpload(self.folder, self.path(hex_digest), hex_digest)

    def free_bytes(self) -> int:
        """Free space where uploads land: the most an upload may bring."""
        self.paths.home.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.folder if self.folder.is_dir() else self.paths.home).free

    def install(self, store: ModelStore, name: str, hex_digest: str, file_name: str, **overrides: object) -> Manifest:
        """Install blob `hex_digest` as model `name` (file `file_name`), moving it into the model's folder.

        Checked first: the blob exists and is a model file llama.cpp can read (BadModelFile
        otherwise, and the blob stays). `overrides` are the manifest's template, system,
        parameters and license. A model already installed as `name` is replaced.
        """
        blob = self.path(hex_digest)
        if not self.has(hex_digest):
            raise BadRequest(f"blob sha256:{hex_digest} has not been uploaded; POST it to /api/blobs/sha256:{hex_digest} first")
        file_name = Path(file_name).name
        if not file_name.lower().endswith(".gguf"):
            raise BadRequest(f"'{file_name[:80]}': only GGUF files (.gguf) can become models")
        store.check_new_name(name)
        info = read_model_info(blob)
        folder = store.folder_for(name)
        target = folder / file_name
        if target.exists() or target.is_symlink():
            target = folder / f"{hex_digest[:12]}-{file_name}"  # the replaced model's file may be another's too
        not_a_link(target, "model file")
        os.replace(blob, target)
        fsync_dir(folder)
        info.path = target
        manifest = store.manifest_for(name, source=f"upload:sha256:{hex_digest}", file=target, sha256=hex_digest,
                                      info=info, **overrides)
        return store.replace_with(manifest)
