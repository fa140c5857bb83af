"""The backend interface: build a compute graph whose constants are its leading inputs,
run it, save and load what it built. Refit logic never looks inside a runner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.fx as fx

Runner = Callable[..., Sequence[torch.Tensor]]


class Backend(Protocol):
    name: str

    def supports(self, node: fx.Node) -> bool:
        """Whether an engine of this backend can run the node."""

    def build(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Runner:
        """Compile `gm` (placeholders: constants first, then activations; returns a tuple)."""

    def dump(self, runner: Runner) -> bytes:
        """The runner as bytes, for save()."""

    def load(self, data: bytes) -> Runner:
        """A runner from dump()'s bytes, already checked against their SHA-256."""
