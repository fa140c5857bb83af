"""An engine cache on disk: the same structure compiles once, later compiles load and refit.

Entries are weight-stripped files keyed by the structural fingerprint (which holds the
engine-affecting settings), the torch version and the device. Entries are written
atomically (a temporary file renamed over the entry), so concurrent writers never leave a
torn one. The cache is only ever an optimization: any failure of its own (an unwritable or
full directory, a corrupt entry, a directory or FIFO where an entry should be) logs one
warning and the compile goes on; a corrupt entry is dropped and rebuilt. The total size
stays under a bound, evicting the least recently used entries; orphaned temporaries of
killed writers are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
from typing import Any

import torch

from .module import CompiledModule
from .refit import refit_module_weights
from .serialize import load, save
from .settings import Settings

logger = logging.getLogger("torchrefit")

DEFAULT_MAX_BYTES = 4 << 30
ORPHAN_SECONDS = 3600  # a temporary this old belongs to no live writer


def cache_key(fingerprint: str, device: torch.device) -> str:
    where = str(device)
    if device.type == "cuda":
        where += f":{torch.cuda.get_device_name(device)}:{torch.cuda.get_device_capability(device)}"
    return hashlib.sha256(f"{fingerprint}|{torch.__version__}|{where}".encode()).hexdigest()


class EngineCache:
    """The cache entry of one structure on one device."""

    def __init__(self, directory: str, key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.key = key
        self.max_bytes = max_bytes

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
        return cls(directory, cache_key(fingerprint, device), settings.cache_max_bytes)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, f"{self.key}.trf")

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
        try:
            module = refit_module_weights(load(path), weights, in_place=True)
        except Exception as exc:  # noqa: BLE001 - any broken entry is rebuilt, never fatal
            logger.warning("engine cache entry %s is unusable (%s); compiling again", path, exc)
            _remove(path)
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves hits
            os.utime(path)  # recently used
        logger.info("engine cache hit: %s", path)
        self._evict()
        return module

    def store(self, module: CompiledModule) -> None:
        """Write the entry (atomically); a failure is a warning."""
        try:
            save(module, self.path, include_weights=False)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimization
            logger.warning(
                "engine cache: could not store %s (%s); compiled module unaffected", self.path, exc
            )
            return
        self._evict()

    def _evict(self) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        entries = []
        now = time.time()
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if (
                name.startswith(".")
                and name.endswith(".tmp")
                and now - info.st_mtime > ORPHAN_SECONDS
            ):
                _remove(path)  # a writer killed midway left it
            elif name.endswith(".trf") and stat.S_ISREG(info.st_mode):
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _remove(path)
            total -= size
            logger.info("engine cache: evicted %s", path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
