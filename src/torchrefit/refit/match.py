"""The match stage: new weights keyed by the compiled program's FQNs.

An ExportedProgram whose structural fingerprint equals the compiled one's takes the fast
path (names as they are). Otherwise the slow path lowers it again and pairs weights by graph
position; another architecture raises IncompatibleWeightsError naming the first difference.
Modules, state_dicts and files are matched by FQN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import (
    IncompatibleWeightsError,
    MissingWeightError,
    TorchRefitError,
    UnexpectedWeightError,
    WeightDtypeError,
    WeightShapeError,
)
from ..export import (
    WeightSpec,
    dtype_name,
    engine_program,
    export_model,
    source_tensors,
    weight_specs,
)
from ..fingerprint import (
    describe,
    fingerprint,
    raise_incompatible,
    source_fingerprint,
    source_structure,
    strip_name,
)
from ..lower import LoweringContext, lower
from ..module import RefitState
from ..weights import WeightProgram
from .files import FileTensor, read_tensor
from .read import NewWeights, Source


@dataclass
class Matched:
    """New source weights keyed by the compiled program's FQNs, and how they were matched."""

    tensors: dict[str, Source]
    path: str  # "fast" or "slow"
    weight_program: WeightProgram
    rename: dict[str, str]  # compiled store key -> key in the evaluation (slow path)


def match(
    new: NewWeights,
    state: RefitState,
    use_cache: bool = True,
    arg_inputs: tuple[Any, ...] | None = None,
    kwarg_inputs: dict[str, Any] | None = None,
) -> Matched:
    """Fast path when the structure is the recorded one; slow path re-lowers and matches."""
    if new.program is not None:
        if (
            use_cache
            and source_fingerprint(new.program, state.settings.engine_key()) == state.fingerprint
        ):
            return fast(new, state)
        if _same_names(new, state):
            by_fqn(new, state)  # a wrong shape or dtype is named as such, not as another graph
        return slow(new, state, arg_inputs, kwarg_inputs)
    if use_cache or new.module is None:
        return fast(new, state)
    if arg_inputs is None:
        raise TorchRefitError(
            "use_weight_map_cache=False with an nn.Module needs arg_inputs to export it; pass "
            "arg_inputs, or an ExportedProgram."
        )
    exported = export_model(new.module, arg_inputs, kwarg_inputs)
    program = NewWeights(dict(source_tensors(exported)), "exported_program", program=exported)
    return slow(program, state, arg_inputs, kwarg_inputs)


def fast(new: NewWeights, state: RefitState) -> Matched:
    return Matched(by_fqn(new, state), "fast", state.weight_program, {})


def _same_names(new: NewWeights, state: RefitState) -> bool:
    names = {state.aliases.get(k, k) for k in new.tensors}
    return names == set(state.specs)


def by_fqn(new: NewWeights, state: RefitState) -> dict[str, Source]:
    """Resolve tied aliases, then check presence, extras, shapes and dtypes."""
    given = _untie(new.tensors, state.aliases)
    extra = sorted(set(given) - set(state.specs))
    missing = [fqn for fqn, spec in state.specs.items() if _required(fqn, spec, given, new, state)]
    if extra:
        raise UnexpectedWeightError(
            f"The new weights hold {len(extra)} name(s) the compiled program does not have: "
            f"{_names(extra, 'unexpected')}"
            + (f"; and lack {len(missing)}: {_names(missing, 'missing')}" if missing else "")
            + ". Rename them (name_map= maps checkpoint names to model names, e.g. "
            "lambda n: n.removeprefix('model.')), or remove them.",
            missing=missing,
            unexpected=extra,
        )
    if missing:
        spec = state.specs[missing[0]]
        raise MissingWeightError(
            f"The new weights lack {len(missing)} weight(s): {_names(missing, 'missing')} (the "
            f"first is a {spec.kind} of {spec.dtype}{list(spec.shape)}). Give every parameter "
            "and persistent buffer of the compiled model.",
            missing=missing,
        )
    tensors: dict[str, Source] = {}
    for fqn, spec in state.specs.items():
        value = given.get(state.aliases.get(fqn, fqn))
        if value is None:
            continue  # a non-persistent buffer or constant a state_dict cannot hold: kept
        _check_spec(fqn, value, spec)
        _check_cast(fqn, value, state.engine_dtypes.get(fqn, value.dtype))
        tensors[fqn] = value
    return tensors


def _untie(tensors: dict[str, Source], aliases: dict[str, str]) -> dict[str, Source]:
    """Names of one tied tensor folded into its canonical FQN; both given must agree."""
    given = dict(tensors)
    for alias, fqn in aliases.items():
        value = given.pop(alias, None)
        if value is None:
            continue
        if fqn in given and not _same(given[fqn], value):
            raise IncompatibleWeightsError(
                f"{alias!r} and {fqn!r} are one tied weight in the compiled model, but the new "
                "weights give them different values. Tie them, or give only one."
            )
        given.setdefault(fqn, value)
    return given


def _check_spec(fqn: str, value: Source, spec: WeightSpec) -> None:
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


def _check_cast(fqn: str, value: Source, engine_dtype: torch.dtype) -> None:
    if not _castable(value.dtype, engine_dtype):
        raise WeightDtypeError(
            f"Weight {fqn!r} has dtype {value.dtype}, which torch cannot cast into the engine's "
            f"{engine_dtype} without losing its meaning (complex into real drops the imaginary "
            f"part; packed float4 has no cast). Give it as {engine_dtype}, or compile with a "
            "dtype that holds it."
        )


@functools.cache
def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether copy_ casts `src` values into `dst` ones (asked of torch with one element)."""
    if src == dst:
        return True
    if src.is_complex and not dst.is_complex:
        return False
    try:
        torch.empty(1, dtype=dst).copy_(torch.zeros(1, dtype=src))
    except (RuntimeError, TypeError):
        return False
    return True


def _required(
    fqn: str, spec: WeightSpec, given: dict[str, Source], new: NewWeights, state: RefitState
) -> bool:
    """Missing and needed: parameters and persistent buffers always; the rest only from an
    ExportedProgram (a module cannot show constants its forward creates); never a buffer
    the forward writes."""
    if state.aliases.get(fqn, fqn) in given:
        return False
    written = state.lineage.get(fqn)
    if written is not None and written.kind == "state":
        return False  # the forward's own state (a KV cache): a refit never sets it
    code_constant = spec.kind == "constant" and new.origin == "module"
    return (spec.persistent or new.complete) and not code_constant


def _names(names: list[str], attribute: str, limit: int = 8) -> str:
    """The first `limit` names; the error's `attribute` lists them all."""
    shown = ", ".join(repr(n) for n in names[:limit])
    rest = len(names) - limit
    return (
        f"[{shown}]"
        if rest <= 0
        else f"[{shown}, and {rest} more: the error's .{attribute} lists all]"
    )


def _same(a: Source, b: Source) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same_memory(a, b):
        return True
    left = read_tensor(a) if isinstance(a, FileTensor) else a
    right = read_tensor(b) if isinstance(b, FileTensor) else b
    return bool(torch.equal(left, right.to(left.device)))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two views of one memory (a tied weight, detached twice)."""
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def slow(new: NewWeights, state: RefitState, arg_inputs: Any, kwarg_inputs: Any) -> Matched:
    """Lower the new program afresh and match the engines' constants by graph position."""
    assert new.program is not None
    source = new.program
    new_lines = source_structure(source, with_names=False)
    old_lines = [strip_name(line) for line in state.structure]
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
    lowered_fp = fingerprint(
        describe(lowered.gm.graph, lowered.labels()), state.settings.engine_key()
    )
    if lowered_fp != state.lowered_structure:
        raise IncompatibleWeightsError(
            "The new program lowers to another graph than the compiled one although their "
            "exported graphs match; recompile with the new model."
        )
    rename = dict(zip(state.lowered_order, lowered.weight_order(), strict=True))
    source_order = [s.fqn for s in weight_specs(source).values()]
    by_position = dict(zip(source_order, state.specs, strict=True))
    tensors: dict[str, Source] = {
        by_position[k]: v for k, v in source_tensors(source).items() if k in by_position
    }
    checked = by_fqn(NewWeights(tensors, "exported_program", program=source), state)
    return Matched(checked, "slow", lowered.weight_program, rename)
