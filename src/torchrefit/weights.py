"""Weight programs and the engine weight store."""

from __future__ import annotations

from collections.abc import Collection
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


ALIGN_BYTES = 256  # what cudaMalloc gives: vectorized kernels read aligned views at full speed


class WeightStore:
    """Every engine and fallback constant, by key (source FQN, or "~name" for derived).

    Constants are views into one flat arena per device and dtype, so a refit can be a few
    batched copies (or one flat copy). Engines hold these very tensors and a refit copies
    into them: addresses never change (invariant 4).
    """

    def __init__(self, values: dict[str, torch.Tensor], *, copy_values: bool = True) -> None:
        self.arenas: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        layout: dict[tuple[torch.device, torch.dtype], list[tuple[str, int]]] = {}
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for key, value in values.items():
            group = (value.device, value.dtype)
            step = max(1, ALIGN_BYTES // value.element_size())
            start = sizes.get(group, 0)
            layout.setdefault(group, []).append((key, start))
            sizes[group] = start + -(-value.numel() // step) * step
        for group, entries in layout.items():
            device, dtype = group
            arena = torch.empty(max(sizes[group], 1), dtype=dtype, device=device)
            self.arenas[group] = arena
            for key, start in entries:
                value = values[key]
                view = arena[start : start + value.numel()].view(value.shape)
                if copy_values:
                    with torch.no_grad():
                        view.copy_(value)
                self.tensors[key] = view

    def empty_like(self, shared: Collection[str] = ()) -> WeightStore:
        """A store of the same constants whose memory is not yet written (a copy's target,
        a standby bank); the `shared` ones are this store's own tensors, not copies (the
        state a forward writes is one memory in both banks of a double buffer)."""
        store = WeightStore(
            {k: t for k, t in self.tensors.items() if k not in shared}, copy_values=False
        )
        if shared:
            own = store.tensors
            store.tensors = {k: t if k in shared else own[k] for k, t in self.tensors.items()}
        return store

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is a view of this store's memory."""
        ranges = self.__dict__.get("_ranges")
        if ranges is None:  # arenas are made once, at init
            ranges = self.__dict__["_ranges"] = [
                (a.data_ptr(), a.data_ptr() + a.numel() * a.element_size())
                for a in self.arenas.values()
            ]
        ptr = tensor.data_ptr()
        for low, high in ranges:
            if low <= ptr < high:
                return True
        return False

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def device(self) -> torch.device:
        device = self.__dict__.get("_device")
        if device is None:  # arenas are made once, at init
            device = next(iter(self.arenas))[0] if self.arenas else torch.device("cpu")
            self.__dict__["_device"] = device
        return device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether a cast can overflow: bfloat16 into float16 narrows though both are 2 bytes."""
    return src != dst and torch.finfo(dst).max < torch.finfo(src).max


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of tensors holding inf or NaN, with one device sync per device when none do."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in tensors.items():
        by_device.setdefault(value.device, []).append(key)
    bad: list[str] = []
    for keys in by_device.values():
        values = [tensors[k] for k in keys if tensors[k].numel()]
        if not values:
            continue
        peaks = torch.stack(torch._foreach_norm(values, float("inf")))
        if not bool(torch.isfinite(peaks).all()):
            bad += [k for k in keys if not bool(torch.isfinite(tensors[k]).all())]
    return bad
