"""A refit bound to fixed source tensors: validated once, then each call copies their
current values into the engines, replayed as a CUDA graph where it can be.

For loops that update weights in place (an optimizer's step, an RL learner, a pinned host
buffer refilled from a checkpoint) and push them into inference every few steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from .copy_kernel import GatherCopy, gather_copy_works
from .errors import TorchRefitError, WeightValueError
from .module import CompiledModule
from .read import read_weights
from .refit import Matched, _fast, _refittable, evaluate, narrows, validate

logger = logging.getLogger("torchrefit")


class Refitter:
    """`Refitter(compiled, weights)()` refits `compiled` from `weights`' current values.

    `weights` is an nn.Module or a state_dict; its tensors are bound once (by identity, not
    by name): after replacing a tensor object, make a new Refitter. Each call is all or
    nothing, like `refit_module_weights(..., in_place=True)`.
    """

    def __init__(self, compiled: CompiledModule, weights: Any, *, cuda_graph: bool = True) -> None:
        self.state = _refittable(compiled)
        if isinstance(weights, (str, os.PathLike)):
            raise TorchRefitError(
                "A Refitter binds tensors that change in place; a file is read once. Refit from "
                "a file with torchrefit.refit_module_weights(module, path, in_place=True)."
            )
        self.matched: Matched = _fast(read_weights(weights, self.state.specs), self.state)
        self.keys = [k for k in self.state.store.keys() if k in self.matched.tensors or self.state.lineage[k].kind == "program"]
        self._compute_graph: torch.cuda.CUDAGraph | None = None
        self._host_sources = any(not t.is_cuda for t in self.matched.tensors.values())
        if cuda_graph and self._capturable():
            self._capture()

    def __call__(self) -> None:
        if self._compute_graph is None:
            values = evaluate(self.matched, self.state)
            validate(values, self.state)
            self.state.store.commit(values)
            self.state.unset -= set(values)
            return
        self._compute_graph.replay()
        if not bool(self._ok):  # the one host sync: nothing has been written yet
            values = evaluate(self.matched, self.state)
            validate(values, self.state)  # raises, naming the weight
            raise WeightValueError("A derived engine constant is not finite; nothing was written.")
        self._copy_graph.replay()
        if self._host_sources:  # the caller may overwrite its host buffers once we return
            torch.cuda.current_stream(self.state.store.device).synchronize()
        self.state.unset -= set(self.keys)

    def _capturable(self) -> bool:
        device = self.state.store.device
        if device.type != "cuda":
            return False
        return all(
            t.device == device or (t.is_pinned() and t.is_contiguous()) for t in self.matched.tensors.values()
        )

    def _compute(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """New values and one device flag saying they are all finite; no host sync."""
        device = self.state.store.device
        program = self.matched.weight_program
        cast = {
            f: t if _stays(t, self.state.engine_dtypes[f], f in program.inputs) else t.to(device=device, dtype=self.state.engine_dtypes[f], non_blocking=True)
            for f, t in self.matched.tensors.items()
        }
        derived = program({f: cast.get(f, self.state.store.tensors.get(f)) for f in program.inputs})
        values = {k: derived[k] if k in derived else cast[k] for k in self.keys}
        checked = [
            v for k, v in values.items()
            if v.is_floating_point() and v.numel() and (k in derived or narrows(self.matched.tensors[k].dtype, v.dtype))
        ]  # identity weights need no check: they are the caller's values as they are
        if not checked:
            return values, torch.ones((), dtype=torch.bool, device=device)
        return values, torch.isfinite(torch.stack(torch._foreach_norm(checked, float("inf")))).all()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self._compute()
        torch.cuda.current_stream().wait_stream(side)
        self._compute_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._compute_graph), torch.no_grad():
            values, self._ok = self._compute()
        self._values = values  # the graph writes here: keep the memory ours
        copies = self.copy_plan = self._copies(values)
        self._copy_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._copy_graph), torch.no_grad():
            for copy in copies:
                copy()
        logger.info("refit of %d constants captured as CUDA graphs", len(values))

    def _copies(self, values: dict[str, torch.Tensor]) -> list[Callable[[], None]]:
        """One gather-copy launch per arena where the kernel works, else batched copies."""
        store = self.state.store
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for key, value in values.items():
            dst = store[key]
            dsts, srcs = groups.setdefault((dst.device, dst.dtype), ([], []))
            dsts.append(dst)
            srcs.append(value)
        copies: list[Callable[[], None]] = []
        for (device, dtype), (dsts, srcs) in groups.items():
            if gather_copy_works(device, dtype):
                copies.append(GatherCopy(store.arenas[(device, dtype)], dsts, srcs))
            else:
                copies.append(_batched_copy(dsts, srcs))
        return copies


def _stays(tensor: torch.Tensor, dtype: torch.dtype, program_input: bool) -> bool:
    """An identity weight is copied from where it is (device, or pinned host over UVA)."""
    return tensor.dtype == dtype and not (program_input and not tensor.is_cuda)


def _batched_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> Callable[[], None]:
    local = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device == d.device]
    remote = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device != d.device]

    def copy() -> None:
        if local:
            torch._foreach_copy_([d for d, _ in local], [s for _, s in local])
        for d, s in remote:
            d.copy_(s, non_blocking=True)

    return copy
