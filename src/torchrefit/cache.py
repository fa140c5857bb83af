"""An engine cache on disk: the same structure compiles once, later compiles load and refit.

Entries are weight-stripped files keyed by the structural fingerprint (which holds the
engine-affecting settings), the torch version and the device. Writers write a temporary
file and rename it, so concurrent writers never leave a torn entry; a corrupted entry is
dropped and rebuilt. The cache keeps its total size under a bound, evicting the least
recently used entries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any

import torch

from .module import CompiledModule
from .refit import refit_module_weights
from .serialize import load, save
from .settings import Settings

logger = logging.getLogger("torchrefit")

DEFAULT_MAX_BYTES = 4 << 30


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
        os.makedirs(directory, exist_ok=True)

    @classmethod
    def open(cls, settings: Settings, fingerprint: str, device: torch.device) -> EngineCache | None:
        """The entry for this structure, or None when `settings` name no cache."""
        if settings.cache_dir is None:
            return None
        return cls(settings.cache_dir, cache_key(fingerprint, device), settings.cache_max_bytes)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, f"{self.key}.trf")

    def load(self, weights: Any) -> CompiledModule | None:
        """The cached module refitted with `weights`, or None on a miss or a bad entry."""
        path = self.path
        if not os.path.exists(path):
            return None
        try:
            module = refit_module_weights(load(path), weights, in_place=True)
        except Exception as exc:  # noqa: BLE001 - any broken entry is rebuilt, never fatal
            logger.warning("engine cache entry %s is unusable (%s); compiling again", path, exc)
            _remove(path)
            return None
        os.utime(path)  # recently used
        logger.info("engine cache hit: %s", path)
        self._evict()
        return module

    def store(self, module: CompiledModule) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save(module, tmp, include_weights=False)
            os.replace(tmp, self.path)  # atomic: readers see the old entry or the new one
        finally:
            _remove(tmp)
        self._evict()

    def _evict(self) -> None:
        entries = []
        for name in os.listdir(self.directory):
            if name.endswith(".trf"):
                path = os.path.join(self.directory, name)
                try:
                    stat = os.stat(path)
                except FileNotFoundError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _remove(path)
            total -= size
            logger.info("engine cache: evicted %s", path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
