"""refit_module_weights(): read, match, evaluate, validate, commit, verify."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import (
    ImmutableWeightsError,
    IncompatibleWeightsError,
    MissingWeightError,
    RefitVerificationError,
    TorchRefitError,
    UnexpectedWeightError,
    WeightDtypeError,
    WeightShapeError,
    WeightValueError,
)
from .export import dtype_name, engine_program, export_model, source_tensors
from .fingerprint import describe, fingerprint, raise_incompatible
from .lower import LoweringContext, lower
from .module import CompiledModule, RefitState
from .read import NewWeights, read_weights
from .verify import compare_outputs
from .weights import WeightProgram

logger = logging.getLogger("torchrefit")


@dataclass
class Matched:
    """New source weights keyed by the compiled program's FQNs, and how they were matched."""

    tensors: dict[str, torch.Tensor]
    path: str  # "fast" or "slow"
    weight_program: WeightProgram
    rename: dict[str, str]  # compiled store key -> key in the evaluation (slow path)


def refit_module_weights(
    compiled_module: CompiledModule,
    new_weight_module: Any,
    arg_inputs: tuple[Any, ...] | None = None,
    kwarg_inputs: dict[str, Any] | None = None,
    verify_output: bool = False,
    use_weight_map_cache: bool = True,
    in_place: bool = False,
    name_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
) -> CompiledModule:
    """Replace the compiled module's weights; all or nothing. Returns the refitted module.

    `name_map` renames the new weights' names to the compiled model's: a dict, or a function
    (returning None drops a name, e.g. optimizer state in a checkpoint)."""
    started = time.perf_counter()
    state = _refittable(compiled_module)
    if isinstance(new_weight_module, (str, os.PathLike)) and not verify_output:
        from .stream import refit_from_file

        streamed = refit_from_file(compiled_module, os.fspath(new_weight_module), name_map, in_place)
        if streamed is not None:
            return streamed
    new = read_weights(new_weight_module, state.specs)
    if name_map is not None:
        new = rename(new, name_map)
    matched = match(new, state, use_weight_map_cache, arg_inputs, kwarg_inputs)
    values = evaluate(matched, state)
    validate(values, state)
    if verify_output and arg_inputs is None:
        raise TorchRefitError("verify_output=True needs arg_inputs to run both models on.")
    target = compiled_module if in_place else _fresh_copy(compiled_module)
    backup = state.store.clone() if verify_output and in_place else None
    target._torchrefit.store.commit(values)
    target._torchrefit.unset = target._torchrefit.unset - set(values)
    logger.info("refit (%s path) took %.2f ms", matched.path, 1e3 * (time.perf_counter() - started))
    if verify_output:
        try:
            _verify(target, new, matched, state, arg_inputs, kwarg_inputs)
        except BaseException:
            if backup is not None:  # all or nothing: the module goes back to its old weights
                target._torchrefit.store.commit(backup.tensors)
                target._torchrefit.unset = set(state.unset)
            raise
    return target


def _refittable(module: Any) -> RefitState:
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


def rename(new: NewWeights, name_map: Mapping[str, str] | Callable[[str], str | None]) -> NewWeights:
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in new.tensors.items():
        target = name_map.get(name, name) if isinstance(name_map, Mapping) else name_map(name)
        if target is None:
            continue
        if target in mapped:
            raise IncompatibleWeightsError(
                f"name_map maps both {origin[target]!r} and {name!r} to {target!r}; map each "
                "weight to its own name."
            )
        mapped[target] = tensor
        origin[target] = name
    return NewWeights(mapped, new.origin if new.origin != "module" else "state_dict", new.program)


# -- match ------------------------------------------------------------------------------


def match(
    new: NewWeights,
    state: RefitState,
    use_cache: bool,
    arg_inputs: tuple[Any, ...] | None,
    kwarg_inputs: dict[str, Any] | None,
) -> Matched:
    """Fast path when the structure is the recorded one; slow path re-lowers and matches."""
    if new.program is not None:
        lines = describe(new.program.graph, _labels(new.program, with_names=True))
        if use_cache and fingerprint(lines, state.settings.engine_key()) == state.fingerprint:
            return _fast(new, state)
        if _same_names(new, state):
            _by_fqn(new, state)  # a wrong shape or dtype is named as such, not as another graph
        return _slow(new, state, arg_inputs, kwarg_inputs)
    if use_cache or new.module is None:
        return _fast(new, state)
    if arg_inputs is None:
        raise TorchRefitError(
            "use_weight_map_cache=False with an nn.Module needs arg_inputs to export it; pass "
            "arg_inputs, or an ExportedProgram."
        )
    exported = export_model(new.module, arg_inputs, kwarg_inputs)
    return _slow(NewWeights(source_tensors(exported), "exported_program", program=exported), state, arg_inputs, kwarg_inputs)


def _same_names(new: NewWeights, state: RefitState) -> bool:
    names = {state.aliases.get(k, k) for k in new.tensors}
    return names == set(state.specs)


def _labels(program: Any, with_names: bool) -> dict[str, str]:
    from .compile import source_labels

    return source_labels(program, with_names)


def _fast(new: NewWeights, state: RefitState) -> Matched:
    tensors = _by_fqn(new, state)
    return Matched(tensors, "fast", state.weight_program, {})


def _by_fqn(new: NewWeights, state: RefitState) -> dict[str, torch.Tensor]:
    """Resolve tied aliases, then check presence, extras, shapes and dtypes."""
    given = dict(new.tensors)
    for alias, fqn in state.aliases.items():
        value = given.pop(alias, None)
        if value is None:
            continue
        if fqn in given and not _same(given[fqn], value):
            raise IncompatibleWeightsError(
                f"{alias!r} and {fqn!r} are one tied weight in the compiled model, but the new "
                "weights give them different values. Tie them, or give only one."
            )
        given.setdefault(fqn, value)
    extra = sorted(set(given) - set(state.specs))
    missing = [fqn for fqn, spec in state.specs.items() if _required(fqn, spec, given, new, state)]
    if extra:
        raise UnexpectedWeightError(
            f"The new weights hold {len(extra)} name(s) the compiled program does not have: "
            f"{_names(extra)}" + (f"; and lack {len(missing)}: {_names(missing)}" if missing else "")
            + ". Rename them (name_map= maps checkpoint names to model names, e.g. "
            "lambda n: n.removeprefix('model.')), or remove them."
        )
    if missing:
        spec = state.specs[missing[0]]
        raise MissingWeightError(
            f"The new weights lack {len(missing)} weight(s): {_names(missing)} (the first is a "
            f"{spec.kind} of {spec.dtype}{list(spec.shape)}). Give every parameter and "
            "persistent buffer of the compiled model."
        )
    tensors: dict[str, torch.Tensor] = {}
    for fqn, spec in state.specs.items():
        value = given.get(state.aliases.get(fqn, fqn))
        if value is None:
            continue  # a non-persistent buffer or constant a state_dict cannot hold: kept
        if tuple(value.shape) != spec.shape:
            raise WeightShapeError(
                f"Weight {fqn!r} has shape {list(value.shape)}; the compiled model expects "
                f"{list(spec.shape)}. Refit with weights of the compiled architecture."
            )
        if dtype_name(value.dtype) != spec.dtype:
            raise WeightDtypeError(
                f"Weight {fqn!r} has dtype {value.dtype}; the compiled model expects "
                f"torch.{spec.dtype}. Convert it first (tensor.to(torch.{spec.dtype})), or "
                "compile with that dtype."
            )
        tensors[fqn] = value
    return tensors


def _required(fqn: str, spec: Any, given: dict[str, torch.Tensor], new: NewWeights, state: RefitState) -> bool:
    """Missing and needed: parameters and persistent buffers always; the rest only from an
    ExportedProgram (a module cannot show constants its forward creates)."""
    if state.aliases.get(fqn, fqn) in given:
        return False
    code_constant = spec.kind == "constant" and new.origin == "module"
    return (spec.persistent or new.complete) and not code_constant


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a, b.to(a.device)))


def _slow(
    new: NewWeights, state: RefitState, arg_inputs: Any, kwarg_inputs: Any
) -> Matched:
    """Lower the new program afresh and match the engines' constants by graph position."""
    assert new.program is not None
    source = new.program
    new_lines = describe(source.graph, _labels(source, with_names=False))
    old_lines = [_strip_name(line) for line in state.structure]
    if new_lines != old_lines:
        raise_incompatible(old_lines, new_lines)
    program = source
    if state.cast_inputs_to is not None:
        if arg_inputs is None:
            raise TorchRefitError(
                "The slow path must convert the new program to the compiled dtype, which needs "
                "arg_inputs; pass them, or refit from an nn.Module or state_dict."
            )
        program = engine_program(source, source.module(), arg_inputs, kwarg_inputs, state.settings)
    lowered = lower(program, LoweringContext(state.settings))
    from .compile import lowered_labels, lowered_weight_order

    lowered_fp = fingerprint(describe(lowered.gm.graph, lowered_labels(lowered)), state.settings.engine_key())
    if lowered_fp != state.lowered_structure:
        raise IncompatibleWeightsError(
            "The new program lowers to another graph than the compiled one although their "
            "exported graphs match; recompile with the new model."
        )
    new_order = lowered_weight_order(lowered)
    rename = dict(zip(state.lowered_order, new_order, strict=True))
    by_position = dict(zip(_source_order(source), state.specs, strict=True))
    tensors = {by_position.get(k, k): v for k, v in source_tensors(source).items() if k in by_position}
    renamed = NewWeights(tensors, "exported_program", program=source)
    checked = _by_fqn(renamed, state)
    return Matched(checked, "slow", lowered.weight_program, rename)


def _source_order(program: Any) -> list[str]:
    from .export import weight_specs

    return [s.fqn for s in weight_specs(program).values()]


def _strip_name(line: str) -> str:
    if not line.startswith("input "):
        return line
    head, _, rest = line.partition(" -> ")
    return f"{head.split(':')[0]} -> {rest}"


# -- evaluate and validate --------------------------------------------------------------


def evaluate(matched: Matched, state: RefitState) -> dict[str, torch.Tensor]:
    """Store key -> new value in the store's dtype.

    Source weights stay on their device (commit copies host tensors straight into the
    engines' buffers, so a refit from the host needs no device staging); only the weight
    program's inputs move to the engines' device.
    """
    device = state.store.device
    cast = {fqn: t.to(dtype=state.engine_dtypes[fqn]) for fqn, t in matched.tensors.items()}
    _check_casts(matched.tensors, cast)
    if matched.rename:  # slow path: the new lowering's names for each compiled store key
        inputs = {matched.rename.get(fqn, fqn): t.to(device) for fqn, t in cast.items()}
        derived = matched.weight_program(inputs)
        derived = {k: derived[matched.rename[k]] for k, v in state.lineage.items() if v.kind == "program"}
    else:
        derived = matched.weight_program(_program_inputs(matched.weight_program, cast, state))
    values: dict[str, torch.Tensor] = {}
    for key in state.store.keys():
        if key in derived:
            values[key] = derived[key]
        elif key in cast:
            values[key] = cast[key]
    # a value read from the store itself (its own constants, swapped) must not be overwritten
    # before it is read: copy those first
    return {k: v.clone() if state.store.holds(v) else v for k, v in values.items()}


def _program_inputs(
    program: WeightProgram, cast: dict[str, torch.Tensor], state: RefitState
) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    for fqn in program.inputs:
        if fqn in cast:
            inputs[fqn] = cast[fqn].to(state.store.device)
        elif fqn in state.store.tensors:
            inputs[fqn] = state.store[fqn]  # a kept non-persistent buffer or constant
        else:
            raise MissingWeightError(
                f"The new weights lack {fqn!r}, which derived engine constants are computed "
                "from. Give it too."
            )
    return inputs


def _check_casts(sources: dict[str, torch.Tensor], cast: dict[str, torch.Tensor]) -> None:
    """A narrowing cast must not turn a finite weight into inf (fp32 1e6 into float16)."""
    narrowed = {
        fqn: value
        for fqn, value in cast.items()
        if value.is_floating_point() and sources[fqn].is_floating_point() and narrows(sources[fqn].dtype, value.dtype)
    }
    for fqn in nonfinite(narrowed):
        src = sources[fqn]
        if bool(torch.isfinite(src).all()):
            raise WeightValueError(
                f"Weight {fqn!r} overflows {cast[fqn].dtype} (largest magnitude "
                f"{src.abs().max().item():.4g}); it would become inf. Rescale it, or compile "
                "with a wider dtype."
            )


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


def validate(values: dict[str, torch.Tensor], state: RefitState) -> None:
    """Shape, dtype and device of every value; finiteness of what a weight program made."""
    for key, value in values.items():
        dst = state.store[key]
        movable = value.device == dst.device or value.device.type == "cpu"
        if value.shape != dst.shape or value.dtype != dst.dtype or not movable:
            raise IncompatibleWeightsError(
                f"Engine constant {key!r} would become {value.dtype}{list(value.shape)} on "
                f"{value.device}; the engine holds {dst.dtype}{list(dst.shape)} on {dst.device}. "
                "Refit with weights of the compiled architecture."
            )
    derived = {
        k: v for k, v in values.items() if state.lineage[k].kind == "program" and v.is_floating_point()
    }
    for key in nonfinite(derived):
        raise WeightValueError(
            f"Engine constant {key!r} (computed from {list(state.lineage[key].sources)}) is not "
            f"finite in {values[key].dtype}. Check those weights for inf, NaN or a batch norm "
            "variance below -eps."
        )


# -- commit and verify ------------------------------------------------------------------


def _fresh_copy(module: CompiledModule) -> CompiledModule:
    """A module sharing the compiled engines, with its own weight store."""
    from .serialize import clone_module

    return clone_module(module, module._torchrefit.store.clone())


def _verify(
    target: CompiledModule,
    new: NewWeights,
    matched: Matched,
    state: RefitState,
    arg_inputs: Any,
    kwarg_inputs: Any,
) -> None:
    """Compare with eager; retry the slow path once after a fast-path mismatch; raise."""
    reference = _reference(new, arg_inputs, kwarg_inputs)
    error = compare_outputs(target(*arg_inputs, **(kwarg_inputs or {})), reference)
    if error is not None and matched.path == "fast" and new.program is not None:
        logger.warning("verification failed after the fast path (%s); retrying the slow path", error)
        retry = _slow(new, state, arg_inputs, kwarg_inputs)
        values = evaluate(retry, state)
        validate(values, state)
        target._torchrefit.store.commit(values)
        error = compare_outputs(target(*arg_inputs, **(kwarg_inputs or {})), reference)
    if error is not None:
        raise RefitVerificationError(
            f"After the refit, {error}. The module was left as it was before the refit. Either "
            "the new weights' model computes something else than the compiled one (another "
            "forward), or this is a torchrefit bug: please report it with the model."
        )


def _reference(new: NewWeights, args: tuple[Any, ...], kwargs: Any) -> Any:
    with torch.no_grad():
        if new.program is not None:
            return new.program.module()(*args, **(kwargs or {}))
        if new.module is not None:
            return new.module(*args, **(kwargs or {}))
    raise TorchRefitError(
        "verify_output=True needs new weights that can run eagerly: an nn.Module or an "
        "ExportedProgram, not a state_dict."
    )


__all__ = ["refit_module_weights"]
