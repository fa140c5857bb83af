"""refit_module_weights(): read, match, evaluate, validate, commit, verify; one stage a line.

Every door into a refit (this call, a bound `Refitter`, `MutableModule`, the engine cache,
`load(path, weights=...)`, the command line) goes through these stages.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import ImmutableWeightsError, TorchRefitError
from ..module import CompiledModule, RefitState
from .commit import commit
from .evaluate import Values, evaluate, validate
from .match import match
from .read import NameMap, read
from .verify import check_verifiable, verify

logger = logging.getLogger("torchrefit")


def refit_module_weights(
    compiled_module: CompiledModule,
    new_weight_module: Any,
    arg_inputs: tuple[Any, ...] | None = None,
    kwarg_inputs: dict[str, Any] | None = None,
    verify_output: bool = False,
    use_weight_map_cache: bool = True,
    in_place: bool = False,
    name_map: NameMap | None = None,
    check_finite: bool | None = None,
    strict: bool = True,
) -> CompiledModule:
    """Replace the compiled module's weights; all or nothing. Returns the refitted module.

    `name_map` renames the new weights' names to the compiled model's: a dict, or a function
    (returning None drops a name, e.g. optimizer state in a checkpoint). `check_finite`
    (default: the module's `Settings.check_finite`) refuses NaN, and inf where the compiled
    constant held none, before anything is written. `strict=False` refits only the weights
    given (the others keep their values; a derived constant they feed is recomputed from them
    and the sources the engine keeps, or refused by name). A peft model given to an engine of
    its base model refits its adapted layers, merged (`W + scale * B @ A`): a partial refit."""
    started = time.perf_counter()
    state = refittable(compiled_module)
    with state.guard.refit:  # refits of one module run one at a time
        new = read(
            new_weight_module, state.specs, name_map, strict=strict, device=state.store.device
        )
        matched = match(new, state, use_weight_map_cache, arg_inputs, kwarg_inputs)
        values = evaluate(matched, state)
        validate(values, state)
        if verify_output:
            check_verifiable(new, arg_inputs)
        # a verified in-place refit runs on a copy first: a failed check changes nothing
        target = commit(compiled_module, values, in_place and not verify_output, check_finite)
        if verify_output:
            verify(target, new, matched, arg_inputs, kwarg_inputs)
            target = adopt(compiled_module, target) if in_place else target
    logger.info("refit (%s path) took %.2f ms", matched.path, 1e3 * (time.perf_counter() - started))
    return target


def refittable(module: Any) -> RefitState:
    """The refit state of a module torchrefit compiled or loaded, if it may be refitted."""
    state = getattr(module, "_torchrefit", None)
    if not isinstance(module, CompiledModule) or state is None:
        raise TorchRefitError(
            f"refit_module_weights got a {type(module).__name__}; expected a module returned "
            "by torchrefit.compile or torchrefit.load."
        )
    if state.settings.immutable_weights:
        raise ImmutableWeightsError(
            "This module was compiled with immutable_weights=True, so its engines may have "
            "folded weights and cannot be refitted. Compile with immutable_weights=False."
        )
    return state


def adopt(module: CompiledModule, verified: CompiledModule) -> CompiledModule:
    """`module` given every constant of `verified`, a refitted copy of it."""
    source = verified._torchrefit
    values = Values({k: t for k, t in source.store.tensors.items() if k not in source.unset})
    return commit(module, values, in_place=True)


__all__ = ["Values", "refit_module_weights", "refittable"]
