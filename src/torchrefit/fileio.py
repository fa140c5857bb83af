"""Atomic file writes: the old file, or the new one, whole; never a torn mix.

A temporary file in the target's directory is written, flushed and fsynced, then renamed
over the target (atomic on POSIX), and the directory is fsynced. Any failure midway (an
exception, a full disk, a kill) leaves the old file untouched; a failure before the rename
removes the temporary, and a kill leaves at most an orphan `.NAME.*.tmp` beside it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from .errors import SerializationError


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` fills a temporary file that then replaces `path` atomically."""
    path = os.path.abspath(os.path.expanduser(path))
    directory, name = os.path.split(path)
    if os.path.isdir(path):
        raise SerializationError(f"Cannot write {path!r}: it is a directory. Pass a file path.")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise _unwritable(path, exc) from exc
        raise
    _fsync_directory(directory)


def _unwritable(path: str, exc: OSError) -> SerializationError:
    return SerializationError(
        f"Cannot write {path!r} ({exc.strerror or exc}); the file that was there, if any, is "
        "unchanged. Free disk space or choose a writable directory."
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
