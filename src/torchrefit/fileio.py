"""Files as torchrefit reads and writes them: regular files only, written atomically.

Reading: `open_regular` opens a path only if it is a regular file (after links), without
blocking: a FIFO, socket, device (/dev/zero) or directory is refused before a byte is read.

Writing: a temporary file in the target's directory is written, flushed and fsynced, then
renamed over the target (atomic on POSIX), and the directory is fsynced. Any failure midway
(an exception, a full disk, a kill) leaves the old file untouched; a failure before the
rename removes the temporary. A kill leaves an orphan `.NAME.*.tmp` beside it: the writer
holds a lock on its temporary for as long as it lives, so a temporary nobody holds a lock
on (and not just created) is an orphan, and the next write of NAME removes it
(`sweep_orphans`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

from .errors import SerializationError

# a temporary this old that no writer holds a lock on is an orphan (the age covers the
# instant between its creation and its writer's lock)
ORPHAN_SECONDS = 60


def open_regular(path: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file; OSError, or ValueError naming what
    it is, otherwise. Opening never blocks (a FIFO without a writer would, forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"it is {kind_of(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def kind_of(mode: int) -> str:
    """What a file of this mode is, in words."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((text for test, text in kinds if test(mode)), "a special file")


def atomic_write(
    path: str,
    write: Callable[[BinaryIO], None],
    check: Callable[[str], None] | None = None,
) -> None:
    """`write(f)` fills a temporary file that then replaces `path` atomically. `check(tmp)`,
    if given, may read the written temporary before the rename; if it raises, `path` is
    left as it was and the temporary removed."""
    path = os.path.abspath(os.path.expanduser(path))
    directory, name = os.path.split(path)
    if os.path.isdir(path):
        raise SerializationError(f"Cannot write {path!r}: it is a directory. Pass a file path.")
    sweep_orphans(directory, temporaries(name))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    lock = -1
    try:
        lock = os.dup(fd)  # holds the lock until the rename: the temporary is not an orphan
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise _unwritable(path, exc) from exc
        raise
    finally:
        if lock >= 0:
            os.close(lock)
    _fsync_directory(directory)


def temporaries(name: str) -> re.Pattern[str]:
    """The names of `atomic_write`'s temporaries for a target named `name`."""
    return re.compile(re.escape(f".{name}.") + r"[A-Za-z0-9_]+" + re.escape(".tmp"))


def sweep_orphans(directory: str, names: re.Pattern[str], age: float = ORPHAN_SECONDS) -> int:
    """Remove the temporaries (names matching `names`) in `directory` that killed writers
    left: regular files no live writer holds a lock on, last written more than `age` seconds
    ago. Returns how many went. Failures are ignored: the sweep is housekeeping."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    return sum(_remove_orphan(entry.path, age) for entry in entries if names.fullmatch(entry.name))


def _remove_orphan(path: str, age: float) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone, a link, or unreadable: not ours to judge
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < age:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it
        os.remove(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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
