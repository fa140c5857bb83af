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


ALIGN_BYTES = 256  # what cudaMalloc gives: vectorized kernels read aligned views at full speed
CHUNK_BYTES = 16 << 20  # staged uploads start every 16 MB, overlapping the host copies


def _align(end: int, item: int) -> int:
    step = max(1, ALIGN_BYTES // item)
    return -(-end // step) * step


def upload_runs(slots: list[tuple[int, int]], item: int) -> list[tuple[int, int]]:
    """(start, end) element ranges covering sorted (start, numel) slots: adjacent slots
    (up to alignment padding) join, and a run closes once it holds CHUNK_BYTES."""
    runs: list[tuple[int, int]] = []
    for start, numel in slots:
        if runs and start == _align(runs[-1][1], item) and (runs[-1][1] - runs[-1][0]) * item < CHUNK_BYTES:
            runs[-1] = (runs[-1][0], start + numel)
        else:
            runs.append((start, start + numel))
    return runs


class WeightStore:
    """Every engine and fallback constant, by key (source FQN, or "~name" for derived).

    Constants are views into one flat arena per device and dtype, so a refit can be a few
    batched copies (or one flat copy). Engines hold these very tensors and a refit copies
    into them: addresses never change (invariant 4).
    """

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.arenas: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.mirrors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # pinned, lazily
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
                with torch.no_grad():
                    view.copy_(value)
                self.tensors[key] = view

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is a view of this store's memory."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(ptr == arena.untyped_storage().data_ptr() for arena in self.arenas.values())

    def keys(self) -> list[str]:
        return list(self.tensors)

    def clone(self) -> WeightStore:
        return WeightStore(self.tensors)

    @property
    def device(self) -> torch.device:
        return next(iter(self.arenas))[0] if self.arenas else torch.device("cpu")

    def commit(self, values: dict[str, torch.Tensor]) -> None:
        """Copy validated values in. Call only after validation: nothing here can fail.

        Same-device values go in batched copies. Pinned host values are copied straight in,
        asynchronously; pageable ones go through a pinned mirror of the arena in contiguous
        runs, so a few hundred small weights cost a few large transfers.
        """
        groups: dict[tuple[torch.device, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for key, value in values.items():
            dst = self.tensors[key]
            dsts, srcs = groups.setdefault((dst.device, value.device), ([], []))
            dsts.append(dst)
            srcs.append(value)
        with torch.no_grad():
            for (dst_device, src_device), (dsts, srcs) in groups.items():
                if dst_device == src_device:
                    torch._foreach_copy_(dsts, srcs)
                elif dst_device.type == "cuda" and src_device.type == "cpu":
                    self._commit_from_host(dsts, srcs)
                    torch.cuda.current_stream(dst_device).synchronize()  # callers may reuse sources
                else:
                    for dst, src in zip(dsts, srcs, strict=True):
                        dst.copy_(src)

    def _commit_from_host(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        staged: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for dst, src in zip(dsts, srcs, strict=True):
            if src.is_pinned():  # the copy engine reads it directly, asynchronously
                dst.copy_(src, non_blocking=True)
            else:
                staged.setdefault((dst.device, dst.dtype), []).append((dst, src))
        for group, pairs in staged.items():
            arena, mirror = self.arenas[group], self._mirror(group)
            item, base = arena.element_size(), arena.data_ptr()
            pairs.sort(key=lambda p: p[0].data_ptr())
            slots = [((d.data_ptr() - base) // item, d.numel()) for d, _ in pairs]
            runs = iter(upload_runs(slots, item))
            next_run = next(runs)
            for (start, numel), (dst, src) in zip(slots, pairs, strict=True):
                mirror[start : start + numel].view(dst.shape).copy_(src)
                if start + numel == next_run[1]:  # a run is filled: upload it while the CPU goes on
                    arena[next_run[0] : next_run[1]].copy_(mirror[next_run[0] : next_run[1]], non_blocking=True)
                    next_run = next(runs, (0, -1))

    def _mirror(self, group: tuple[torch.device, torch.dtype]) -> torch.Tensor:
        mirror = self.mirrors.get(group)
        if mirror is None:
            arena = self.arenas[group]
            mirror = self.mirrors[group] = torch.empty(arena.numel(), dtype=arena.dtype, pin_memory=True)
        return mirror

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
