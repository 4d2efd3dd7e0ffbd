"""The store touches only files it made: no symbolic link is followed, no name leaves the store.

A folder or file inside the store that is a symbolic link was put there by
someone else; following it would let a `.partial` link truncate a file
elsewhere, or `rm` delete through it. So the store's files are opened with
O_NOFOLLOW (a link fails instead of being followed) and its folders are
checked with lstat before use. (The store's own root may be a link: that is
where the user chose to keep it.)

Model names are checked before they reach the file system: valid text, no
control characters, at most MAX_NAME_BYTES bytes (a file name's limit).
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
from pathlib import Path
from typing import BinaryIO

from localllm.core.errors import BadRequest, UnsafeStorePath

MAX_NAME_BYTES = 255  # per path component on the common file systems

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = {
    "rb": os.O_RDONLY,
    "r+b": os.O_RDWR,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+b": os.O_RDWR | os.O_CREAT,
}


def not_a_link(path: Path, what: str) -> None:
    """Refuse a folder or file the store did not make (a symbolic link)."""
    if path.is_symlink():
        raise UnsafeStorePath(
            f"{path} is a symbolic link, not a {what} the store made; it is left alone (remove it yourself)"
        )


def open_fd(path: Path, flags: int, what: str, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link at `path` instead of following it."""
    if not _NOFOLLOW:  # no O_NOFOLLOW (Windows): check first, a narrow race
        not_a_link(path, what)
    try:
        return os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and path.is_symlink()):
            not_a_link(path, what)
        raise


def open_file(path: Path, mode: str, what: str, buffering: int = -1) -> BinaryIO:
    """open(path, mode) for the store's binary files ("rb", "r+b", "wb", "w+b"), never through a link.

    "w+b" opens for update and creates the file if needed, without truncating.
    """
    fd = open_fd(path, _FLAGS[mode], what)
    return os.fdopen(fd, "r+b" if mode == "w+b" else mode, buffering=buffering)


def is_own_file(path: Path) -> bool:
    """A regular file itself, not a link to one (Path.is_file follows links)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_model_name(name: object) -> str:
    """`name` if it may name a model in the store; else BadRequest saying why, in one line."""
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("a model name must be non-empty text")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("a model name must be valid text (it holds a lone surrogate)") from None
    if size > MAX_NAME_BYTES:
        raise BadRequest(f"a model name is at most {MAX_NAME_BYTES} bytes (this one has {size})")
    if any(unicodedata.category(c) == "Cc" for c in name):  # C0, DEL and C1 controls
        raise BadRequest("a model name must not hold control characters")
    return name


def check_path_text(text: str) -> None:
    """A model path from the command line: no NUL or control characters, no component over the limit."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise BadRequest("a model path must not hold control characters")
    try:
        parts = [len(part.encode("utf-8")) for part in Path(text).parts]
    except UnicodeEncodeError:
        raise BadRequest("a model path must be valid text") from None
    if any(n > MAX_NAME_BYTES for n in parts):
        raise BadRequest(f"a model path has a part longer than {MAX_NAME_BYTES} bytes")
