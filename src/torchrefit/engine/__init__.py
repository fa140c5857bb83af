"""Backends: each builds a compute graph whose constants are its leading inputs."""

from __future__ import annotations

from typing import Any

from ..errors import SettingsError
from .base import Backend, Runner
from .eager import EagerBackend
from .inductor import InductorBackend


def get_backend(name: str, options: dict[str, Any] | None = None) -> Backend:
    if name == "inductor":
        return InductorBackend(options)
    if name == "eager":
        return EagerBackend()
    raise SettingsError(f"Unknown backend {name!r}; expected 'inductor' or 'eager'.")


__all__ = ["Backend", "EagerBackend", "InductorBackend", "Runner", "get_backend"]
