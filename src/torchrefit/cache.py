"""An engine cache on disk: the same structure compiles once, later compiles load and refit.

Entries are weight-stripped files keyed by the structural fingerprint (which holds the
engine-affecting settings), the torch version and the device. Entries are written
atomically (a temporary file renamed over the entry), so concurrent writers never leave a
torn one. The cache is only ever an optimization: any failure of its own (an unwritable or
full directory, a corrupt entry, a directory or FIFO where an entry should be) logs one
warning and the compile goes on; a corrupt entry is dropped and rebuilt. The total size
stays under a bound, evicting the least recently used entries; orphaned temporaries of
killed writers are removed.

The cache deletes only what it wrote: an entry is named `<64 hex digits>.trf` and carries a
marker naming its key (the zip archive's comment, read from the file's last bytes), and a
temporary is `.<entry name>.*.tmp` that no live writer holds a lock on. Any other file in
the directory (another `.trf`, a temporary of another program) is never touched.
A hit takes the compiling call's settings: the entry's own describe its engines only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
from typing import Any

import torch

from .fileio import sweep_orphans
from .module import CompiledModule
from .refit import refit_module_weights
from .serialize import load, weights_bytes, write
from .settings import Settings

logger = logging.getLogger("torchrefit")

DEFAULT_MAX_BYTES = 4 << 30
ENTRY = re.compile(r"[0-9a-f]{64}\.trf")
TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.trf\.[A-Za-z0-9_]+\.tmp")
_END = b"PK\x05\x06"  # the zip end-of-central-directory record, 22 bytes before its comment


def cache_key(fingerprint: str, device: torch.device) -> str:
    where = str(device)
    if device.type == "cuda":
        where += f":{torch.cuda.get_device_name(device)}:{torch.cuda.get_device_capability(device)}"
    return hashlib.sha256(f"{fingerprint}|{torch.__version__}|{where}".encode()).hexdigest()


class EngineCache:
    """The cache entry of one structure on one device."""

    def __init__(
        self, directory: str, key: str, max_bytes: int = DEFAULT_MAX_BYTES, settings: Any = None
    ) -> None:
        self.directory = directory
        self.key = key
        self.max_bytes = max_bytes
        self.settings: Settings = settings or Settings(cache_dir=directory)

    @classmethod
    def open(cls, settings: Settings, fingerprint: str, device: torch.device) -> EngineCache | None:
        """The entry for this structure, or None when `settings` name no cache or the
        directory cannot be made (a warning: the compile goes on)."""
        if settings.cache_dir is None:
            return None
        directory = os.path.expanduser(settings.cache_dir)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            logger.warning("engine cache %s is unusable (%s); compiling without it", directory, exc)
            return None
        return cls(directory, cache_key(fingerprint, device), settings.cache_max_bytes, settings)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, f"{self.key}.trf")

    @property
    def marker(self) -> bytes:
        return marker(self.key)

    def load(self, weights: Any) -> CompiledModule | None:
        """The cached module refitted with `weights`, or None on a miss or a bad entry."""
        path = self.path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("engine cache entry %s is unreadable (%s); compiling again", path, exc)
            return None
        if not stat.S_ISREG(mode):  # never open a FIFO, socket, device or directory
            logger.warning("engine cache entry %s is not a regular file; compiling again", path)
            return None
        if not is_entry(path):
            logger.warning("engine cache: %s was not written by the cache; compiling again", path)
            return None
        try:
            module = self._refitted(path, weights)
        except Exception as exc:  # noqa: BLE001 - any broken entry is rebuilt, never fatal
            logger.warning("engine cache entry %s is unusable (%s); compiling again", path, exc)
            _remove(path)
            return None
        if module is None:
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves hits
            os.utime(path)  # recently used
        logger.info("engine cache hit: %s", path)
        self._evict()
        return module

    def _refitted(self, path: str, weights: Any) -> CompiledModule | None:
        """The entry loaded (bounded by the weights it is refitted with), given the compiling
        call's settings, refitted; None if it holds engines of other settings."""
        module = load(path, weights_bytes=weights_bytes(weights))
        if module.settings.engine_key() != self.settings.engine_key():
            logger.warning("engine cache entry %s holds other engines; compiling again", path)
            return None
        module._torchrefit.settings = self.settings
        return refit_module_weights(module, weights, in_place=True)

    def store(self, module: CompiledModule) -> None:
        """Write the entry (atomically), marked as the cache's; a failure is a warning."""
        try:
            write(module, self.path, include_weights=False, comment=self.marker)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimization
            logger.warning(
                "engine cache: could not store %s (%s); compiled module unaffected", self.path, exc
            )
            return
        self._evict()

    def _evict(self) -> None:
        """Remove orphaned temporaries of killed writers, then the least recently used
        entries while the cache is over its bound: only files the cache wrote."""
        sweep_orphans(self.directory, TEMPORARY)
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        entries = []
        for name in names:
            path = os.path.join(self.directory, name)
            if not ENTRY.fullmatch(name):
                continue
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and is_entry(path):
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _remove(path)
            total -= size
            logger.info("engine cache: evicted %s", path)


def marker(key: str) -> bytes:
    """What an entry of `key` carries as its zip comment: the cache wrote it."""
    return f"torchrefit engine cache entry {key}".encode()


def is_entry(path: str) -> bool:
    """Whether `path` is a regular file the cache wrote: named `<key>.trf`, ending with the
    zip record whose comment is the marker of that key (the last bytes of the file)."""
    name = os.path.basename(path)
    if not ENTRY.fullmatch(name):
        return False
    expected = marker(name.removesuffix(".trf"))
    tail = len(expected) + 22
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < tail:
            return False
        data = os.pread(fd, tail, info.st_size - tail)
    except OSError:
        return False
    finally:
        os.close(fd)
    length = int.from_bytes(data[20:22], "little")
    return data[:4] == _END and length == len(expected) and data[22:] == expected


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
