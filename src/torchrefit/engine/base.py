"""The backend interface: build a compute graph whose constants are its leading inputs,
run it, save and load what it built. Refit logic never looks inside a runner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

Runner = Callable[..., Sequence[torch.Tensor]]


class Backend(Protocol):
    name: str

    def supports(self, node: fx.Node) -> bool:
        """Whether an engine of this backend can run the node."""

    def build(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Runner:
        """Compile `gm` (placeholders: constants first, then activations; returns a tuple)."""

    def specialize(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Runner | None:
        """`gm` compiled for exactly the shapes of `example_inputs` (real tensors), or None
        where that gains nothing over `build`."""

    def dump(self, runner: Runner) -> bytes:
        """The runner as bytes, for save()."""

    def load(self, data: bytes) -> Runner:
        """A runner from dump()'s bytes, already checked against their SHA-256."""


def data_dependent(node: fx.Node) -> bool:
    """Whether the node makes or reads a value whose size (or value) is known only at run
    time, an unbacked symbol: `x[mask]`, `nonzero`, `unique`, `.item()` and what uses them.
    Making one waits for the device; a graph reading one cannot be compiled for its shape."""
    values = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    return any(free_unbacked_symbols(v) for v in values if v is not None)
