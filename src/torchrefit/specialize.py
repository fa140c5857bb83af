"""Engines compiled again for exact input shapes (a decoder's one-token step).

A dynamic engine serves every shape its Dims allow, with sizes as symbols: a matrix product
stays a library call whatever its size. For a hot shape, one call with example inputs runs
with each engine noting its activations; each engine then gets a variant compiled for
exactly those (`Backend.specialize`), which later calls of that signature run. A variant
reads the same constants as its engine, so refits, double buffering and CUDA graphs see it
as the engine itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .engine import get_backend
from .module import CompiledModule, Engine, Variant, signature

logger = logging.getLogger("torchrefit")

Call = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) of one call


def specialize(module: CompiledModule, calls: list[Call]) -> bool:
    """Variants of `module`'s engines for the activations each of `calls` gives them;
    False if one failed to compile (logged; those calls run the general engine). State the
    calls write (a KV cache, a counter) is restored after, from a copy kept on the host (a
    second cache on the device could be more than it holds)."""
    state = module._torchrefit
    engines = module.engines()
    written = [k for k, lineage in state.lineage.items() if lineage.kind == "state"]
    kept = {k: state.store[k].to("cpu", copy=True) for k in written}
    complete = True
    try:
        for args, kwargs in calls:
            for activations, engine in _recorded(module, engines, args, kwargs):
                complete &= _add_variant(engine, activations, state.settings.inductor_options)
    finally:
        with torch.no_grad():
            for key, value in kept.items():
                state.store[key].copy_(value)
    return complete


def _recorded(
    module: CompiledModule, engines: dict[str, Engine], args: tuple[Any, ...], kwargs: dict
) -> list[tuple[tuple[Any, ...], Engine]]:
    """One call of `module`; the activations each engine was called with (noted by a
    `forward` of the instance for this call only: the engines' own path does no bookkeeping)."""
    recorded: list[tuple[tuple[Any, ...], Engine]] = []

    def noting(engine: Engine) -> Any:
        def forward(*activations: Any) -> Any:
            recorded.append((activations, engine))
            return Engine.forward(engine, *activations)

        return forward

    for engine in engines.values():
        engine.__dict__["forward"] = noting(engine)
    try:
        with torch.no_grad():
            module._run(args, kwargs, graphs=False)
        return recorded
    finally:
        for engine in engines.values():
            del engine.__dict__["forward"]


def _add_variant(
    engine: Engine, activations: tuple[Any, ...], options: tuple[tuple[str, Any], ...]
) -> bool:
    """A variant for `activations` unless the engine has one (or cannot: loaded from a
    file, or a backend that gains nothing); False where its compile failed."""
    key = signature(activations)
    source = engine.__dict__["source"]
    if key in engine.variants or source is None:  # a loaded engine keeps its file's variants
        return True
    started = time.perf_counter()
    examples = [*engine.constants().values(), *activations]
    try:
        runner = get_backend(engine.backend, dict(options)).specialize(source, examples)
    except Exception as exc:  # noqa: BLE001 - a variant is a speed-up: the engine still serves
        logger.warning(
            "no engine variant for %s (%s: %s); those calls run the general engine",
            _shown(key),
            type(exc).__name__,
            str(exc)[:200],
        )
        return False
    if runner is not None:
        engine.variants[key] = Variant(runner)
        logger.info(
            "compiled a variant for %s in %.1f s", _shown(key), time.perf_counter() - started
        )
    return True


def _shown(key: tuple[Any, ...]) -> str:
    return ", ".join(f"{list(k[1])}" if isinstance(k[0], torch.dtype) else repr(k[1]) for k in key)


__all__ = ["Call", "specialize"]
