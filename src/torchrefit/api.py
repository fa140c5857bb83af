"""The public doors that compose stages: load a file, then refit it with separate weights."""

from __future__ import annotations

from typing import Any

from . import serialize
from .module import CompiledModule
from .refit import refit_module_weights


def load(path: str, weights: Any = None) -> CompiledModule:
    """Read a file written by `save`. A file saved without weights needs `weights` (anything
    `refit_module_weights` takes); without them the module refuses to run."""
    module = serialize.load(path)
    if weights is not None:
        refit_module_weights(module, weights, in_place=True)
    return module


save = serialize.save

__all__ = ["load", "save"]
