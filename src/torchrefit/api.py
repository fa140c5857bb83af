"""The public doors that compose stages: load a file, then refit it with separate weights."""

from __future__ import annotations

from typing import Any

from . import serialize
from .module import CompiledModule
from .refit import refit_module_weights


def load(path: str, weights: Any = None, *, max_bytes: int | None = None) -> CompiledModule:
    """Read a file written by `save`. A file saved without weights needs `weights` (anything
    `refit_module_weights` takes); without them the module refuses to run.

    `max_bytes` bounds the memory the file may claim beyond the bytes it holds (placeholders
    of stripped weights, a decoder's KV cache), checked before anything is allocated;
    default: the file's size, plus 1 GiB, plus 4 times the size of `weights`."""
    size = 0 if weights is None else serialize.weights_bytes(weights)
    module = serialize.load(path, max_bytes=max_bytes, weights_bytes=size)
    if weights is not None:
        refit_module_weights(module, weights, in_place=True)
    return module


save = serialize.save

__all__ = ["load", "save"]
