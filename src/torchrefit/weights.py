"""Weight programs and the engine weight store."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .graph_io import graph_from_json, graph_to_json


class WeightProgram:
    """Source weights (by FQN) -> derived engine constants, as a graph of aten ops."""

    def __init__(self, graph: fx.Graph, inputs: list[str], outputs: list[str]) -> None:
        self.graph = graph
        self.inputs = inputs  # source FQN per placeholder, in order
        self.outputs = outputs  # derived key per output, in order
        self._module = fx.GraphModule(torch.nn.Module(), graph)

    @classmethod
    def empty(cls) -> WeightProgram:
        graph = fx.Graph()
        graph.output(())
        return cls(graph, [], [])

    def __call__(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.outputs:
            return {}
        with torch.no_grad():
            values = self._module(*(sources[fqn] for fqn in self.inputs))
        return dict(zip(self.outputs, values, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {"graph": graph_to_json(self.graph), "inputs": self.inputs, "outputs": self.outputs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeightProgram:
        return cls(graph_from_json(data["graph"]), list(data["inputs"]), list(data["outputs"]))


class WeightStore:
    """Every engine and fallback constant, by key (source FQN, or "~name" for derived).

    Engines hold these very tensors; a refit copies into them, so addresses never change.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def clone(self) -> WeightStore:
        return WeightStore({k: t.clone() for k, t in self.tensors.items()})

    def commit(self, values: dict[str, torch.Tensor]) -> None:
        """Copy validated values in, batched per device. Call only after validation."""
        groups: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for key, value in values.items():
            dst = self.tensors[key]
            dsts, srcs = groups.setdefault(dst.device, ([], []))
            dsts.append(dst)
            srcs.append(value)
        with torch.no_grad():
            for dsts, srcs in groups.values():
                torch._foreach_copy_(dsts, srcs)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
