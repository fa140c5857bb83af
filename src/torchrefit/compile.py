"""compile(): export, lower, partition, build, cache; one stage a line."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
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


def _compile(
    model: torch.nn.Module | ExportedProgram,
    arg_inputs: tuple[Any, ...],
    kwarg_inputs: dict[str, Any] | None,
    settings: Settings,
) -> CompiledModule:
    started = time.perf_counter()
    source = export_model(model, arg_inputs, kwarg_inputs)
    key = "|".join([source_fingerprint(source, settings.engine_key()), *dynamic_ranges(source)])
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
    logger.info(
        "compiled %d engine(s) in %.1f s", len(compiled.engines()), time.perf_counter() - started
    )
    if cache is not None:
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


def _target_device(source: ExportedProgram, settings: Settings) -> torch.device:
    if settings.device is not None:
        return torch.device(settings.device)
    return program_device(source)


__all__ = ["compile"]
