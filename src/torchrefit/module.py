"""The compiled module: an fx.GraphModule whose children are engines and fallbacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._pytree import tree_flatten_spec

from .cuda_graphs import CudaGraphs
from .engine.base import Runner
from .errors import TorchRefitError
from .export import WeightSpec
from .lower.context import Lineage
from .settings import Settings
from .weights import WeightProgram, WeightStore


class InputError(TorchRefitError, TypeError):
    """The compiled module was called with inputs unlike the ones it was compiled for."""


class WeightsNotLoadedError(TorchRefitError):
    """A module loaded from a file saved without weights was run before a refit."""


class Engine(torch.nn.Module):
    """One compiled partition. Its constants are tensors of the weight store, read in place."""

    def __init__(
        self,
        backend: str,
        runner: Runner,
        constant_keys: list[str],
        single_output: bool,
        artifact: bytes | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.runner = runner
        self.constant_keys = constant_keys
        self.single_output = single_output
        self.artifact = artifact  # the runner's bytes, once dumped
        self._constants: list[torch.Tensor] = []

    def bind(self, store: WeightStore) -> None:
        self._constants = [store[k] for k in self.constant_keys]

    def constants(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.constant_keys, self._constants, strict=True))

    def forward(self, *activations: torch.Tensor) -> Any:
        outputs = self.runner(*self._constants, *activations)
        return outputs[0] if self.single_output else tuple(outputs)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, constants={len(self.constant_keys)}"


class Fallback(fx.GraphModule):
    """A partition PyTorch runs op by op; its weights are buffers bound to the weight store."""

    constant_keys: list[str]

    def bind(self, store: WeightStore) -> None:
        for i, key in enumerate(self.constant_keys):
            self._buffers[f"_w{i}"] = store[key]


def make_fallback(graph: fx.Graph, constant_keys: list[str]) -> Fallback:
    module = torch.nn.Module()
    for i in range(len(constant_keys)):
        module.register_buffer(f"_w{i}", torch.empty(0), persistent=False)
    fallback = Fallback(module, graph)
    fallback.constant_keys = constant_keys
    return fallback


@dataclass
class InputGuard:
    dtype: torch.dtype
    device: torch.device
    ndim: int


@dataclass
class RefitState:
    """What a refit needs, recorded at compile time."""

    settings: Settings
    fingerprint: str  # of the source program, names included
    structure: list[str]  # the source program's node descriptors, for explanations
    lowered_structure: str  # fingerprint of the lowered graph without names (slow path)
    specs: dict[str, WeightSpec]  # source FQN -> spec, in signature order
    aliases: dict[str, str]  # tied name -> FQN
    engine_dtypes: dict[str, torch.dtype]  # source FQN -> dtype the engines' program holds
    weight_program: WeightProgram
    lineage: dict[str, Lineage]  # store key -> lineage
    store: WeightStore
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    guards: list[InputGuard]
    lowered_order: list[str] = field(default_factory=list)  # source FQNs by lowered position
    cast_inputs_to: torch.dtype | None = None
    host_buffer: torch.Tensor | None = None  # reused by refits from files
    unset: set[str] = field(default_factory=set)  # constants a stripped file did not hold


class CompiledModule(fx.GraphModule):
    """Takes the model's inputs, returns its output structure; refit with refit_module_weights."""

    _torchrefit: RefitState

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self._torchrefit
        if state.unset:
            raise WeightsNotLoadedError(
                f"This module was loaded without its weights ({len(state.unset)} constants, e.g. "
                f"{sorted(state.unset)[0]!r}), so it would compute garbage. Supply them: "
                "torchrefit.load(path, weights=...) or refit_module_weights(module, weights, "
                "in_place=True)."
            )
        try:
            flat = tree_flatten_spec((args, kwargs), state.in_spec)
        except Exception as exc:
            raise InputError(
                f"The compiled module takes inputs structured as {state.in_spec}; got "
                f"{len(args)} positional and keyword(s) {sorted(kwargs)}."
            ) from exc
        flat = [_guard(i, x, g, state.cast_inputs_to) for i, (x, g) in enumerate(zip(flat, state.guards, strict=True))]
        if state.settings.cuda_graphs and _all_cuda(flat):
            outputs = self._graphs().run(flat)
        else:
            outputs = super().__call__(*flat)
        return pytree.tree_unflatten(list(outputs), state.out_spec)

    def _graphs(self) -> CudaGraphs:
        graphs = self.__dict__.get("_cuda_graphs")
        if graphs is None:
            graphs = self.__dict__["_cuda_graphs"] = CudaGraphs(lambda *xs: super(CompiledModule, self).__call__(*xs))
        return graphs

    def engines(self) -> dict[str, Engine]:
        return {n: m for n, m in self.named_children() if isinstance(m, Engine)}

    def fallbacks(self) -> dict[str, Fallback]:
        return {n: m for n, m in self.named_children() if isinstance(m, Fallback)}

    def bind(self, store: WeightStore) -> None:
        self._torchrefit.store = store
        for child in self.children():
            if isinstance(child, (Engine, Fallback)):
                child.bind(store)

    @property
    def settings(self) -> Settings:
        return self._torchrefit.settings

    def weight_map(self) -> dict[str, Lineage]:
        """Every constant the engines and fallbacks hold, and how it is computed."""
        return dict(self._torchrefit.lineage)


def _all_cuda(flat: list[Any]) -> bool:
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(x.is_cuda for x in tensors)


def _guard(i: int, x: Any, guard: InputGuard | None, cast_to: torch.dtype | None) -> Any:
    if guard is None:
        return x
    if not isinstance(x, torch.Tensor):
        raise InputError(f"Input {i} is a {type(x).__name__}; the compiled module expects a tensor.")
    if x.dtype != guard.dtype:
        if cast_to is not None and x.is_floating_point() and guard.dtype == cast_to:
            x = x.to(cast_to)
        else:
            raise InputError(
                f"Input {i} has dtype {x.dtype}; the compiled module expects {guard.dtype}. "
                f"Pass x.to({guard.dtype})."
            )
    if x.device != guard.device:
        raise InputError(
            f"Input {i} is on {x.device}; the compiled module runs on {guard.device}. "
            f"Pass x.to('{guard.device}')."
        )
    if x.dim() != guard.ndim:
        raise InputError(
            f"Input {i} has {x.dim()} dimensions (shape {tuple(x.shape)}); the compiled "
            f"module expects {guard.ndim}."
        )
    return x
