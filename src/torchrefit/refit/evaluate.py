"""The evaluate and validate stages: new engine constants, and their layout checked.

`evaluate` turns matched source weights into store values (casts to the engine dtype, the
weight program for derived constants) without a host sync, so `Refitter` captures this very
code as a CUDA graph. `validate` checks every value's shape, dtype and device before
anything is read or written. The finiteness check runs where values are copied (the
commit's `Transfer`); what it refuses is named here (`raise_nonfinite`), and its torch
reductions for values no kernel reads are here (`refused_on_cpu`, `all_finite`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import IncompatibleWeightsError, MissingWeightError, WeightValueError
from ..module import RefitState
from ..quantize import QUANTIZED_DTYPES
from ..weights import nonfinite
from .files import FileTensor, buffer_bytes, peak_magnitude, read_tensor
from .match import Matched
from .read import Source


@dataclass
class Values:
    """Store key -> new value in the store's dtype; `streamed`: store key -> bytes in a file,
    cast as they are copied."""

    tensors: dict[str, torch.Tensor]
    streamed: dict[str, FileTensor] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)  # store key -> source, when cast
    # host memory was read asynchronously (a pinned source moved to the device): the commit
    # syncs before returning, so the caller may reuse it
    host_read: bool = False

    def keys(self) -> set[str]:
        return set(self.tensors) | set(self.streamed)


def evaluate(matched: Matched, state: RefitState, keys: set[str] | None = None) -> Values:
    """The new value of every store key (or of `keys`) that the matched weights determine.

    Identity weights stay where they are (commit copies host tensors straight into the
    engines' buffers); casts run where the source is, pinned host sources on the device;
    weight-program inputs move to the engines' device.
    """
    store = state.store
    program = matched.weight_program
    inverse = {new: old for old, new in matched.rename.items()}
    needed = {inverse.get(name, name) for name in program.inputs}
    # state the forward writes (a counter, a cache) is the module's own: refits keep it
    wanted = _refitted(state) if keys is None else [k for k in _refitted(state) if k in keys]
    streamed: dict[str, FileTensor] = {}
    cast: dict[str, torch.Tensor] = {}
    host_read = False
    engine_dtypes, device = state.engine_dtypes, store.device
    for fqn, source in matched.tensors.items():
        if isinstance(source, FileTensor):
            if fqn not in needed:
                streamed[fqn] = source
                continue
            source = read_tensor(source)
        dtype = engine_dtypes[fqn]
        if source.dtype is dtype and fqn not in needed:
            cast[fqn] = source  # identity: copied from where it is
        else:
            cast[fqn] = _cast(source, dtype, device, fqn in needed)
            host_read |= source.device != cast[fqn].device
    derived = _derived(matched, state, cast, inverse)
    values = {
        k: derived[k] if k in derived else cast[k] for k in wanted if k in derived or k in cast
    }
    # a value read from the store itself (its own constants, swapped) must not be overwritten
    # before it is read: copy those first
    holds = store.holds
    owned = {k: v.clone() if holds(v) else v for k, v in values.items()}
    sources = {
        k: matched.tensors[k] for k in owned if k in cast and cast[k] is not matched.tensors[k]
    }
    streams = {k: v for k, v in streamed.items() if k in wanted}
    return Values(owned, streams, sources, host_read)


def _refitted(state: RefitState) -> list[str]:
    """The store keys a refit may write: all but the forward's own state."""
    cached = state.__dict__.get("_refitted")
    if cached is None:
        cached = state.__dict__["_refitted"] = [
            k for k in state.store.keys() if state.lineage[k].kind != "state"
        ]
    return cached


def _cast(
    tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, program_input: bool
) -> torch.Tensor:
    if tensor.dtype == dtype and not (program_input and tensor.device != device):
        return tensor
    if tensor.device != device and tensor.is_pinned():
        return tensor.to(device=device, dtype=dtype, non_blocking=True)
    tensor = tensor.to(dtype=dtype)
    return tensor.to(device) if program_input else tensor


def _derived(
    matched: Matched, state: RefitState, cast: dict[str, torch.Tensor], inverse: dict[str, str]
) -> dict[str, torch.Tensor]:
    program = matched.weight_program
    if not program.outputs:
        return dict(matched.direct)
    inputs: dict[str, torch.Tensor] = {}
    for name in program.inputs:
        fqn = inverse.get(name, name)
        if fqn in cast:
            inputs[name] = cast[fqn]
        elif fqn in state.store.tensors:
            inputs[name] = state.store[fqn]  # kept: a constant, or a weight not given
        else:
            raise MissingWeightError(
                f"The new weights lack {fqn!r}, which derived engine constants are computed "
                "from. Give it too.",
                missing=[fqn],
            )
    outputs = program(inputs)
    # a quantized checkpoint's weights and scales are placed as they are (`match.prequantized`)
    derived_keys = [
        k
        for k, lineage in state.lineage.items()
        if lineage.kind == "program" and k not in matched.direct
    ]
    if matched.partial:  # only the constants the given weights feed (`match.partial_program`)
        derived_keys = [k for k in derived_keys if matched.rename.get(k, k) in outputs]
    return {**matched.direct, **{k: outputs[matched.rename.get(k, k)] for k in derived_keys}}


def validate(values: Values, state: RefitState) -> None:
    """Shape, dtype and device of every value, before anything is read or written; raises
    naming the constant. Values are checked for NaN and inf where they are copied (the
    commit's `Transfer`): read once, before the first write into a store calls use."""
    check_layout(values, state)


def check_layout(values: Values, state: RefitState) -> None:
    """Every value has its constant's shape and dtype, on its device or the host."""
    layout = _layout(state)
    for key, value in values.tensors.items():
        shape, dtype, index = layout[key]
        where = value.get_device()
        if value.shape != shape or value.dtype is not dtype or (where != index and where >= 0):
            dst = state.store[key]
            raise IncompatibleWeightsError(
                f"Engine constant {key!r} would become {value.dtype}{list(value.shape)} on "
                f"{value.device}; the engine holds {dst.dtype}{list(dst.shape)} on {dst.device}. "
                "Refit with weights of the compiled architecture."
            )
    for key, t in values.streamed.items():
        if t.shape != tuple(state.store[key].shape):
            raise IncompatibleWeightsError(
                f"Engine constant {key!r} would become {list(t.shape)} from {t.path!r}; the "
                f"engine holds {list(state.store[key].shape)}."
            )


def _layout(state: RefitState) -> dict[str, tuple[torch.Size, torch.dtype, int]]:
    """Per constant: shape, dtype and device index (-1 for the CPU), as every bank holds it."""
    cached = state.__dict__.get("_layout")
    if cached is None:
        cached = state.__dict__["_layout"] = {
            k: (t.shape, t.dtype, t.get_device()) for k, t in state.store.tensors.items()
        }
    return cached


def raise_nonfinite(
    tensors: dict[str, torch.Tensor],
    sources: dict[str, Source],
    state: RefitState,
    partial: list[str] | tuple[str, ...] = (),
) -> None:
    """Raise naming the first value the finiteness check refuses among `tensors` (by key,
    or key@start for a range of one); returns if none holds one. `partial`: constants a
    failed write may have reached, now unset."""
    candidates = {k: _readable(v) for k, v in tensors.items() if _checked_dtype(v.dtype)}
    for name in nonfinite({k: v for k, v in candidates.items() if v.numel()}):
        key = name.split("@", 1)[0]
        value = candidates[name]
        if key in state.inf_allowed and not bool(torch.isnan(value).any()):
            continue
        raise WeightValueError(_refusal(key, value, sources.get(key), state) + unset_note(partial))


def _refusal(key: str, value: torch.Tensor, source: Source | None, state: RefitState) -> str:
    lineage = state.lineage[key]
    if lineage.kind == "program":
        return (
            f"Engine constant {key!r} (computed from {list(lineage.sources)}) is not "
            f"finite in {value.dtype}. Check those weights for inf, NaN or a batch norm "
            "variance below -eps."
        )
    peak = _source_peak(source)
    if peak is not None and peak == peak and peak != float("inf"):
        return (
            f"Weight {key!r} overflows {value.dtype} (largest magnitude {peak:.4g}); it "
            "would become inf. Rescale it, or compile with a wider dtype."
        )
    nan = bool(torch.isnan(value).any())
    what = "NaN" if nan else "inf, which it did not hold when compiled"
    return (
        f"Weight {key!r} holds {what}; it was not written. Refit with finite weights "
        "(check the training step that produced them)."
    )


def unset_note(partial: list[str] | tuple[str, ...]) -> str:
    if not partial:
        return ""
    return (
        f" The source changed while it was read twice (it is larger than staging_bytes), so "
        f"{len(partial)} constants may hold new values: they are marked unset and the module "
        "refuses to run until a refit succeeds."
    )


def _checked_dtype(dtype: torch.dtype) -> bool:
    """Floating and complex values; quantized (float8) constants are not read: their
    float32 scales are (a source row holding NaN or inf gives a scale that is not finite),
    and a quantized checkpoint's values are checked as they are bound (`match`)."""
    return (dtype.is_floating_point or dtype.is_complex) and dtype not in QUANTIZED_DTYPES


def _real(value: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (NaN in either is NaN)."""
    return torch.view_as_real(value) if value.is_complex() else value


def refused_on_cpu(tensors: dict[str, torch.Tensor], inf_allowed: set[str]) -> bool:
    """Whether a value holds NaN, or inf outside `inf_allowed`: torch reductions wherever
    the tensors are, one host sync (see `all_finite`)."""
    strict = [
        v if v.dtype in _PLAIN else _readable(v)
        for k, v in tensors.items()
        if k not in inf_allowed and v.numel()
    ]
    if strict and not all_finite(strict):
        return True
    return any(
        bool(torch.isnan(_readable(v)).any()) for k, v in tensors.items() if k in inf_allowed
    )


def all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every value is finite, from one reduction per value: a sum (or a norm) is
    NaN or inf when a value is (IEEE arithmetic propagates both) and reads at memory speed
    without a temporary; only a reduction that is not finite (a refusal, or a finite
    overflow of the reduction itself) is looked at exactly."""
    return finite_groups(by_dtype(values))


LARGE = 1 << 16  # elements: a value this large gets a sum of its own


def by_dtype(values: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Values planned for `finite_groups`: per dtype, the large ones one by one (a call
    each, as fast as memory: torch's sum reads at about 25 GB/s on two cores, its norm at
    about a third of that) and the small ones together (one `_foreach_norm` call)."""
    groups: dict[tuple[torch.dtype, bool], list[torch.Tensor]] = {}
    for value in values:
        value = value if value.dtype in _PLAIN else _readable(value)
        groups.setdefault((value.dtype, value.numel() >= LARGE), []).append(value)
    return list(groups.values())


_PLAIN = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


def finite_groups(groups: list[list[torch.Tensor]]) -> bool:
    """`all_finite` of values planned by `by_dtype`, planned once by callers that check the
    same tensors every time."""
    for group in groups:
        if group[0].numel() >= LARGE:
            reductions = torch.stack([value.sum() for value in group])
        else:
            reductions = torch.stack(torch._foreach_norm(group, 2))
        if bool(torch.isfinite(reductions).all()):
            continue
        for value in group:
            low, high = torch.aminmax(value)
            if not (math.isfinite(float(low)) and math.isfinite(float(high))):
                return False
    return True


def _readable(value: torch.Tensor) -> torch.Tensor:
    """`value` as torch's reductions read it: complex as real pairs, one-byte floats
    (float8) upcast."""
    value = _real(value)
    return value.float() if value.element_size() == 1 else value


def _source_peak(source: Source | None) -> float | None:
    """The largest magnitude of a weight before its cast (NaN or inf if it held one)."""
    if isinstance(source, FileTensor):
        return peak_magnitude(source, torch.empty(buffer_bytes(), dtype=torch.uint8))
    if isinstance(source, torch.Tensor) and source.numel() and source.is_floating_point():
        return float(source.float().abs().max().item())
    return None


def name_streamed(values: Values, state: RefitState) -> None:
    """A reading pass over floating file weights (NaN, inf, a narrowing cast's overflow);
    no write."""
    scratch: torch.Tensor | None = None
    for key, t in values.streamed.items():
        target = state.store[key].dtype
        if not (t.dtype.is_floating_point and target.is_floating_point):
            continue
        scratch = torch.empty(buffer_bytes(), dtype=torch.uint8) if scratch is None else scratch
        peak = peak_magnitude(t, scratch)
        if peak != peak:
            raise WeightValueError(f"Weight {key!r} in {t.path!r} holds NaN; it was not written.")
        if not peak <= torch.finfo(target).max and key not in state.inf_allowed:
            raise WeightValueError(
                f"Weight {key!r} overflows {target} (largest magnitude {peak:.4g}); it would "
                "become inf. Rescale it, or compile with a wider dtype."
            )
