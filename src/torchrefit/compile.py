"""compile(): export, lower, partition, build, cache; one stage a line."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from .build import build, program_device
from .cache import EngineCache
from .calls import program_signature, signature_of
from .engine import get_backend
from .export import TRACING, engine_program, export_model
from .fingerprint import dynamic_ranges, source_fingerprint
from .lower import LoweringContext, lower
from .module import CompiledModule
from .partition import Capability, partition
from .settings import Settings
from .specialize import Call, specialize

logger = logging.getLogger("torchrefit")


def compile(
    model: torch.nn.Module | ExportedProgram,
    arg_inputs: tuple[Any, ...],
    kwarg_inputs: dict[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    **overrides: Any,
) -> CompiledModule:
    """Compile `model` into refittable engines; `overrides` are `Settings` fields."""
    settings = Settings.from_overrides(settings, **overrides)
    with TRACING:  # one compile at a time in a process: tracing state is global
        return _compile(model, arg_inputs, kwarg_inputs, settings)


def compile_with_variants(
    model: torch.nn.Module | ExportedProgram,
    arg_inputs: tuple[Any, ...],
    kwarg_inputs: dict[str, Any] | None,
    settings: Settings,
    exact: list[Call],
) -> CompiledModule:
    """`compile`, and engine variants for the exact shapes of the `exact` calls (specialize.py),
    cached with the engines."""
    with TRACING:
        return _compile(model, arg_inputs, kwarg_inputs, settings, exact)


def _compile(
    model: torch.nn.Module | ExportedProgram,
    arg_inputs: tuple[Any, ...],
    kwarg_inputs: dict[str, Any] | None,
    settings: Settings,
    exact: list[Call] | None = None,
) -> CompiledModule:
    started = time.perf_counter()
    source = export_model(model, arg_inputs, kwarg_inputs)
    key = "|".join(
        [
            source_fingerprint(source, settings.engine_key()),
            *dynamic_ranges(source),
            *(_shapes(call) for call in exact or []),
        ]
    )
    cache = EngineCache.open(settings, key, _target_device(source, settings))
    cached = cache.load(weights=source) if cache is not None else None
    if cached is not None:
        return _with_signature(cached, model, source)
    program = engine_program(source, model, arg_inputs, kwarg_inputs, settings)
    lowered = lower(program, LoweringContext(settings))
    backend = get_backend(settings.backend, dict(settings.inductor_options))
    parts = partition(
        lowered.gm, settings, Capability(settings.torch_executed_ops, backend.supports)
    )
    compiled = build(source, program, lowered, parts, backend, settings)
    complete = specialize(compiled, exact) if exact else True
    for engine in compiled.engines().values():
        engine.__dict__["source"] = None  # the partition graphs are not needed any more
    logger.info(
        "compiled %d engine(s) in %.1f s", len(compiled.engines()), time.perf_counter() - started
    )
    if cache is not None and complete:  # a variant that failed may compile another time
        cache.store(compiled)
    return _with_signature(compiled, model, source)


def _with_signature(
    compiled: CompiledModule, model: torch.nn.Module | ExportedProgram, source: ExportedProgram
) -> CompiledModule:
    """Calls bind as `model.forward` binds them (defaults included), or as the program
    records its arguments; a cached engine may come from a model that named them otherwise."""
    forward = signature_of(model.forward) if isinstance(model, torch.nn.Module) else None
    compiled._torchrefit.signature = forward or program_signature(source)
    return compiled


def _shapes(call: Call) -> str:
    """An exact call in the cache key: the shapes and dtypes of its tensors."""
    leaves = pytree.tree_leaves(call)
    return "exact " + ",".join(
        f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x) for x in leaves
    )


def _target_device(source: ExportedProgram, settings: Settings) -> torch.device:
    if settings.device is not None:
        return torch.device(settings.device)
    return program_device(source)


__all__ = ["compile", "compile_with_variants"]
