"""Why new weights do not fit the compiled program, said so a user can act: names a renaming
explains (a wrapper's or a checkpoint's prefix, renamed modules) are a naming problem and the
error suggests the `name_map`; any other difference is one of architecture, described by
its first differing weight (dtype and shape on both sides) and how many differ.

Only the match stage's failures reach here: the fast path (`match.by_fqn`) never explains.
"""

from __future__ import annotations

from ..errors import (
    MissingWeightError,
    UnexpectedWeightError,
    WeightDtypeError,
    WeightShapeError,
)
from ..export import WeightSpec, dtype_name
from ..module import RefitState
from .read import NewWeights, Source


def explain_names(
    new: NewWeights, state: RefitState, given: dict[str, Source], quantized: frozenset[str]
) -> None:
    """Raise for names the compiled program lacks or weights the refit needs and lacks;
    return where the only absences are weights a refit keeps (non-persistent buffers and
    constants a state_dict cannot hold, the forward's own state). Names that a renaming
    explains (a prefix, or as many weights of the same shapes) are a naming problem; any
    other difference is one of architecture, described by its first differing weight."""
    extra = sorted(set(given) - set(state.specs))
    missing = [
        fqn
        for fqn, spec in state.specs.items()
        if not new.partial and fqn not in quantized and _required(fqn, spec, given, new, state)
    ]
    if not extra and not missing:
        return
    hint = _renaming(extra, missing, given, state, new.partial) if extra else None
    if hint is not None or (extra and new.partial):  # a partial refit names what it gives
        lack = f"; and lack {len(missing)}: {_names(missing, 'missing')}" if missing else ""
        raise UnexpectedWeightError(
            f"The new weights hold {len(extra)} name(s) the compiled program does not have: "
            f"{_names(extra, 'unexpected')}{lack}. Rename them ({hint or _RENAME}), or remove "
            "them.",
            missing=missing,
            unexpected=extra,
        )
    message = difference(given, state, extra, missing, new.origin in _MODELS)
    if extra:
        raise UnexpectedWeightError(
            message + "Compile the new model (torchrefit.compile), or refit with weights of the "
            "compiled architecture; a name_map returning None drops names a checkpoint holds "
            "besides the model's.",
            missing=missing,
            unexpected=extra,
        )
    raise MissingWeightError(
        message + "Give every parameter and persistent buffer of the compiled model, or pass "
        "strict=False to refit only the weights given (a partial refit).",
        missing=missing,
    )


def difference(
    given: dict[str, Source],
    state: RefitState,
    extra: list[str],
    missing: list[str],
    model: bool = True,
) -> str:
    """Two architectures compared weight by weight: how many differ, and the first (in the
    new weights' order) with its dtype and shape on both sides. `model`: the new weights are
    a whole model's (a module), so weights it lacks are architecture too, not a partial
    state_dict."""
    specs = state.specs
    reshaped = [k for k, v in given.items() if k in specs and tuple(v.shape) != specs[k].shape]
    odd = set(extra) | set(reshaped)
    first = next((k for k in given if k in odd), None) or (missing[0] if missing else "")
    where = (
        f"The first is {first!r}: {_layout_text(given.get(first))} in the new weights, "
        f"{_spec_text(specs.get(first))} in the compiled model. "
    )
    if not odd and not model:
        return (
            f"The new weights lack {len(missing)} weight(s): {_names(missing, 'missing')}. " + where
        )
    counts = [
        f"{len(extra)} the compiled model does not have: {_names(extra, 'unexpected')}"
        if extra
        else "",
        f"{len(missing)} it needs that they lack: {_names(missing, 'missing')}" if missing else "",
        f"{len(reshaped)} of another shape" if reshaped else "",
    ]
    total = len(extra) + len(missing) + len(reshaped)
    return (
        f"The new weights are of another architecture than the compiled model: {total} "
        f"weight(s) differ ({'; '.join(c for c in counts if c)}). " + where
    )


_MODELS = ("module", "exported_program")


def _layout_text(value: Source | None) -> str:
    return "absent" if value is None else f"{dtype_name(value.dtype)}{list(value.shape)}"


def _spec_text(spec: WeightSpec | None) -> str:
    return "absent" if spec is None else f"{spec.dtype}{list(spec.shape)}"


_RENAME = "name_map= maps checkpoint names to model names, e.g. lambda n: n.removeprefix('model.')"


def _renaming(
    extra: list[str],
    missing: list[str],
    given: dict[str, Source],
    state: RefitState,
    partial: bool = False,
) -> str | None:
    """How a renaming would explain the names: a prefix to strip or add (a DDP, FSDP or peft
    wrapper's, a checkpoint's) for at least half of the names missing (of a partial refit's
    unknown ones), or as many weights of the same shapes in the same order (renamed
    modules); None when no renaming does (another architecture)."""
    if not missing and not partial:
        return None
    wanted, unknown = set(missing or state.specs), set(extra)
    enough = len(missing or extra)
    for stripped in (True, False):
        prefixes: dict[str, int] = {}
        for name in extra if stripped else missing:
            parts = name.split(".")
            for i in range(1, len(parts)):
                tail = ".".join(parts[i:])
                if tail in (wanted if stripped else unknown):
                    prefix = ".".join(parts[:i]) + "."
                    prefixes[prefix] = prefixes.get(prefix, 0) + 1
        if prefixes:
            prefix, count = max(prefixes.items(), key=lambda item: item[1])
            if count * 2 >= enough:
                return (
                    f"name_map=lambda n: n.removeprefix({prefix!r})"
                    if stripped
                    else f"name_map=lambda n: {prefix!r} + n"
                )
    shapes = [tuple(given[k].shape) for k in given if k in unknown]
    if missing and shapes == [state.specs[k].shape for k in missing]:
        return _RENAME
    return None


def check_spec(
    fqn: str,
    value: Source,
    spec: WeightSpec,
    given: dict[str, Source] | None = None,
    state: RefitState | None = None,
) -> None:
    if tuple(value.shape) != spec.shape:
        others = ""
        if given is not None and state is not None:
            extra = sorted(set(given) - set(state.specs))
            others = " " + difference(given, state, extra, [])
        raise WeightShapeError(
            f"Weight {fqn!r} has shape {list(value.shape)}; the compiled model expects "
            f"{list(spec.shape)}.{others.rstrip()} Refit with weights of the compiled "
            "architecture."
        )
    if dtype_name(value.dtype) != spec.dtype:
        raise WeightDtypeError(
            f"Weight {fqn!r} has dtype {value.dtype}; the compiled model expects "
            f"torch.{spec.dtype}. Convert it first (tensor.to(torch.{spec.dtype})), or "
            "compile with that dtype."
        )


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
