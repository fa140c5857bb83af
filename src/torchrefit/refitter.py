"""A refit bound to fixed source tensors: read and matched once, then each call evaluates,
validates and commits their current values through the refit core, replayed as two CUDA
graphs where it can be (the evaluate stage with its finiteness flag; the commit's copy plan).

For loops that update weights in place (an optimizer's step, an RL learner, a pinned host
buffer refilled from a checkpoint) and push them into inference every few steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from .errors import TorchRefitError, WeightDtypeError, WeightShapeError
from .module import CompiledModule, RefitState
from .refit import refittable
from .refit.commit import CopyPlan, commit, commit_by, copy_plan
from .refit.evaluate import (
    Flagged,
    check_layout,
    checked,
    evaluate,
    finite_check,
    raise_nonfinite,
    tensors_flag,
    validate,
)
from .refit.match import Matched, fast
from .refit.read import read
from .weights import WeightStore

logger = logging.getLogger("torchrefit")


class Refitter:
    """`Refitter(compiled, weights)()` refits `compiled` from `weights`' current values.

    `weights` is an nn.Module or a state_dict; its tensors are bound once (by identity, not
    by name): after replacing a tensor object, make a new Refitter. Each call is all or
    nothing, like `refit_module_weights(..., in_place=True)`.

    `check_finite=False` skips the NaN/inf check of the new values before a plain module's
    copy (a full read of them before the first write): for trainers whose weights are known
    finite. A double-buffered module checks what it writes into its standby bank either
    way, so it never serves a NaN; on CUDA its copy kernel checks as it copies, at no
    extra read.
    """

    def __init__(
        self,
        compiled: CompiledModule,
        weights: Any,
        *,
        cuda_graph: bool = True,
        check_finite: bool = True,
    ) -> None:
        self.module = compiled
        self.check_finite = check_finite
        self.state = refittable(compiled)
        if isinstance(weights, (str, os.PathLike)):
            raise TorchRefitError(
                "A Refitter binds tensors that change in place; a file is read once. Refit from "
                "a file with torchrefit.refit_module_weights(module, path, in_place=True)."
            )
        self.matched: Matched = fast(read(weights, self.state.specs), self.state)
        self.tensors = _tensors(self.matched)
        # the caller's own tensor objects (a Parameter whose .data is swapped stays the same
        # object, while the detached alias bound above keeps the old memory)
        self._originals = _originals(weights, self.tensors)
        self._bound = _signature(self._originals)
        self._graphs: _Graphs | None = None
        if cuda_graph and self._capturable():
            self._graphs = _Graphs(self.matched, self.state, check_finite)

    def __call__(self) -> None:
        self._check_bound()
        with self.state.guard.refit:
            if self._graphs is None:
                values = evaluate(self.matched, self.state)
                # without the check, what validate does for a double-buffered module
                (validate if self.check_finite else check_layout)(values, self.state)
                commit(self.module, values, in_place=True)
            else:
                self._graphs.run(self.module)

    def _check_bound(self) -> None:
        """A bound tensor changed dtype, shape or memory in place (`.data = ...`): refuse, as
        a refit from it would (and a captured graph would read the old memory). One list
        comparison per call; the loop below only names what changed."""
        if _signature(self._originals) == self._bound:
            return
        for (fqn, tensor), (ptr, dtype, shape) in zip(
            self._originals.items(), self._bound, strict=True
        ):
            if tensor.dtype != dtype:
                raise WeightDtypeError(
                    f"Bound weight {fqn!r} is now {tensor.dtype}; it was {dtype} when the "
                    "Refitter was made. Make a new Refitter."
                )
            if tensor.shape != shape:
                raise WeightShapeError(
                    f"Bound weight {fqn!r} now has shape {list(tensor.shape)}; it had "
                    f"{list(shape)} when the Refitter was made. Make a new Refitter."
                )
            if tensor.data_ptr() != ptr:
                raise TorchRefitError(
                    f"Bound weight {fqn!r} now lives in other memory (its .data was replaced); "
                    "a Refitter binds tensors once. Make a new Refitter."
                )

    def _capturable(self) -> bool:
        device = self.state.store.device
        if device.type != "cuda":
            return False
        return all(
            t.device == device or (t.is_pinned() and t.is_contiguous())
            for t in self.tensors.values()
        )


def _originals(weights: Any, bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(weights, torch.nn.Module):
        given: dict[str, Any] = dict(weights.named_parameters(remove_duplicate=False))
        given.update(weights.named_buffers(remove_duplicate=False))
    else:
        given = dict(weights)
    return {k: given[k] if isinstance(given.get(k), torch.Tensor) else t for k, t in bound.items()}


def _signature(tensors: dict[str, torch.Tensor]) -> list[tuple[int, torch.dtype, torch.Size]]:
    return [(t.data_ptr(), t.dtype, t.shape) for t in tensors.values()]


def _tensors(matched: Matched) -> dict[str, torch.Tensor]:
    """The bound tensors (a module's or a state_dict's: never file entries)."""
    tensors = {k: t for k, t in matched.tensors.items() if isinstance(t, torch.Tensor)}
    assert len(tensors) == len(matched.tensors)
    return tensors


class _Graphs:
    """The core's evaluate stage, its finiteness check, and the commit's copy plan (one per
    buffer a double-buffered module flips between), each captured as a CUDA graph over the
    bound tensors. A plain module checks before it copies (a second graph, made once the
    values' memory is fixed); a double-buffered one flags as it copies into its standby."""

    def __init__(self, matched: Matched, state: RefitState, check_finite: bool) -> None:
        self.matched, self.state = matched, state
        self.host_sources = any(not t.is_cuda for t in _tensors(matched).values())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            evaluate(matched, state)  # warm up outside the graph
        torch.cuda.current_stream().wait_stream(side)
        self.compute = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.compute), torch.no_grad():
            self.values = evaluate(matched, state)  # the graph writes here: keep the memory ours
        self.check: tuple[Callable[[], torch.Tensor], torch.cuda.CUDAGraph, torch.Tensor] | None
        self.check, self.on_host = None, {}
        if check_finite and not state.settings.double_buffer:
            values = checked(self.values)
            # pinned host weights copied as they are: the CPU checks them before each copy
            self.on_host = {k: v for k, v in values.items() if not v.is_cuda}
            on_device = {k: v for k, v in values.items() if v.is_cuda}
            check = finite_check(on_device, state.inf_allowed, state.store.device)
            check()  # outside the graph first: self-tests, kernel compiles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ok = check()
            self.check = (check, graph, ok)  # the check's tables must outlive its graph
        # per target buffer: the copy plan (its tables must outlive the graph) and its graph
        self.copies: dict[int, tuple[CopyPlan, torch.cuda.CUDAGraph]] = {}
        logger.info("refit of %d constants captured as CUDA graphs", len(self.values.tensors))

    def run(self, module: CompiledModule) -> None:
        state = self.state
        self.compute.replay()
        if self.check is not None:
            _, graph, ok = self.check
            graph.replay()
            host_ok = tensors_flag(self.on_host, state.inf_allowed, torch.device("cpu"))
            if not (bool(ok) and bool(host_ok)):  # the one host sync: nothing written yet
                raise_nonfinite(self.values.tensors, self.values.sources, state)
        commit_by(module, set(self.values.tensors), self._replay_copy)
        if self.host_sources:
            torch.cuda.current_stream().synchronize()  # the caller may overwrite its host buffers

    def _replay_copy(self, store: WeightStore) -> Flagged | None:
        """Copy into `store`; into a standby, the copy flags what it writes, and the flag is
        read once, before the flip (`check_written`)."""
        if id(store) not in self.copies:
            standby = self.state.settings.double_buffer
            inf_allowed = self.state.inf_allowed if standby else None
            plan = copy_plan(store, self.values.tensors, inf_allowed)
            self.copies[id(store)] = (plan, _captured(plan))
        plan, graph = self.copies[id(store)]
        graph.replay()
        return plan.flagged


def _captured(run: Callable[[], None]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph
