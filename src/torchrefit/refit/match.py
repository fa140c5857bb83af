"""The match stage: new weights keyed by the compiled program's FQNs.

An ExportedProgram whose structural fingerprint equals the compiled one's takes the fast
path (names as they are). Otherwise the slow path lowers it again and pairs weights by graph
position; another architecture raises IncompatibleWeightsError naming the first difference.
Modules, state_dicts and files are matched by FQN. A partial refit (`strict=False`) matches the
weights given; the derived constants they feed are recomputed from them and the sources the
store keeps (`partial_program`), or refused by name.
"""

from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..errors import (
    IncompatibleWeightsError,
    MissingWeightError,
    TorchRefitError,
    WeightDtypeError,
    WeightShapeError,
    WeightValueError,
)
from ..export import (
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
from ..quantize import QUANTIZE_WEIGHT, QUANTIZED_DTYPES, SCALE_SUFFIX, dequantize, format_of
from ..weights import WeightProgram
from .explain import check_spec, explain_names
from .files import FileTensor, read_tensor
from .read import NewWeights, Source


@dataclass
class Matched:
    """New source weights keyed by the compiled program's FQNs, and how they were matched."""

    tensors: dict[str, Source]
    path: str  # "fast" or "slow"
    weight_program: WeightProgram
    rename: dict[str, str]  # compiled store key -> key in the evaluation (slow path)
    # derived store key -> its value as given (a quantized checkpoint's weight and scales),
    # placed as it is; `weight_program` then computes only the other derived constants
    direct: dict[str, torch.Tensor] = field(default_factory=dict)
    # only the weights given and the derived constants they feed are refitted
    partial: bool = False


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
    if use_cache or new.module is None or new.partial:
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
    new, direct, program, given = prequantized(new, state)
    tensors = by_fqn(new, state, given)
    if new.partial:
        program = partial_program(program, set(tensors) | given, state)
    return Matched(tensors, "fast", program, {}, direct, new.partial)


def partial_program(program: WeightProgram, given: set[str], state: RefitState) -> WeightProgram:
    """What a partial refit of the weights `given` recomputes: the outputs of `program` that
    read one of them, and only what those need. Each other source they read must be kept by
    the store (an identity or cast constant holds its source's value); else the refit is
    refused, naming the constant and the sources it lacks. Planned once per set of names."""
    if not program.outputs:
        return program
    cache = state.__dict__.setdefault("_partial_programs", {})
    key = (id(program), frozenset(given))
    hit = cache.get(key)
    if hit is not None and hit[0] is program:
        return hit[1]
    nodes = list(program.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    touched = {n for n, fqn in zip(placeholders, program.inputs, strict=True) if fqn in given}
    for node in nodes:  # topological order: a node reading a touched node is touched
        if node.op != "placeholder" and any(a in touched for a in node.all_input_nodes):
            touched.add(node)
    results = next(n for n in nodes if n.op == "output").args[0]
    unchanged = {k for k, v in zip(program.outputs, results, strict=True) if v not in touched}
    partial = pruned(program, unchanged)
    _check_kept(partial, given, state)
    if len(cache) >= 16:
        cache.clear()
    cache[key] = (program, partial)
    return partial


def _check_kept(program: WeightProgram, given: set[str], state: RefitState) -> None:
    """Every source `program` reads is given or kept by the store."""
    store = state.store.tensors
    lacking = [fqn for fqn in program.inputs if fqn not in given and fqn not in store]
    if not lacking:
        return
    short = set(lacking)
    constants = [k for k in program.outputs if short & set(state.lineage[k].sources)]
    first = constants[0] if constants else program.outputs[0]
    sources = list(state.lineage[first].sources)
    raise MissingWeightError(
        f"A partial refit (strict=False) changes {len(constants)} derived engine constant(s) "
        f"whose sources it gives only in part: {first!r} is computed from {sources}, and "
        f"{[s for s in sources if s in short]} are neither given nor kept by the engine (they "
        "live only inside derived constants). Give them too, or refit every weight.",
        missing=lacking,
    )


def _same_names(new: NewWeights, state: RefitState) -> bool:
    names = {state.aliases.get(k, k) for k in new.tensors}
    return names == set(state.specs)


def by_fqn(
    new: NewWeights, state: RefitState, quantized: frozenset[str] = frozenset()
) -> dict[str, Source]:
    """Resolve tied aliases, then check presence, extras, shapes and dtypes. `quantized`:
    weights given as quantized weights and scales, bound directly (never missing)."""
    given = _untie(new.tensors, state.aliases) if state.aliases else new.tensors
    rows, uncastable, targets = _rows(state)
    tensors: dict[str, Source] = {}
    absent: list[str] = []
    for fqn, target, shape, dtype in rows:  # the common case: names, shapes, dtypes as compiled
        value = given.get(target)
        if value is None:
            absent.append(fqn)
            continue
        if value.shape != shape or value.dtype is not dtype:
            check_spec(fqn, value, state.specs[fqn], given, state)  # raises, naming it
        tensors[fqn] = value
    if (absent and not new.partial) or given.keys() - targets:
        explain_names(new, state, given, quantized)
    for fqn in uncastable & tensors.keys():
        value = tensors[fqn]
        _check_cast(fqn, value, state.engine_dtypes.get(fqn, value.dtype))
    return tensors


def _rows(
    state: RefitState,
) -> tuple[list[tuple[str, str, torch.Size, Any]], set[str], frozenset[str]]:
    """Per weight of the compiled program: its FQN, the name it is given under (tied
    weights: the canonical one), its shape and dtype; the weights whose dtype torch cannot
    cast into the engine's; and every name a weight is given under. Made once per module."""
    cached = state.__dict__.get("_match_rows")
    if cached is None:
        rows = [
            (fqn, state.aliases.get(fqn, fqn), torch.Size(spec.shape), _DTYPES.get(spec.dtype))
            for fqn, spec in state.specs.items()
        ]
        uncastable = {
            fqn
            for fqn, spec in state.specs.items()
            if spec.dtype in _DTYPES
            and not _castable(
                _DTYPES[spec.dtype], state.engine_dtypes.get(fqn, _DTYPES[spec.dtype])
            )
        }
        targets = frozenset(target for _, target, _, _ in rows)
        cached = state.__dict__["_match_rows"] = (rows, uncastable, targets)
    return cached


_DTYPES = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


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


# -- quantized checkpoints ------------------------------------------------------------------


@dataclass(frozen=True)
class Quantized:
    """A weight program's quantization of one source weight: its format, orientation and
    the store keys of its outputs."""

    fmt: str
    columns: bool
    q_key: str
    s_key: str


def prequantized(
    new: NewWeights, state: RefitState
) -> tuple[NewWeights, dict[str, torch.Tensor], WeightProgram, frozenset[str]]:
    """Quantized weights among `new` (`X.weight` of float8_e4m3fn or int8 beside a float
    `X.weight_scale` with one scale per output channel, as compressed-tensors checkpoints
    hold them): bound as they are to the engine's quantized constants of the same format;
    dequantized (`q.float() * scale`, cast to the weight's dtype) for every other use (a
    full-precision engine, another format, a tied embedding). Returns the weights left,
    the values bound directly, the weight program of the other derived constants, and the
    weights the direct values stand for."""
    pairs = {
        name: name + SCALE_SUFFIX
        for name, t in new.tensors.items()
        if t.dtype in QUANTIZED_DTYPES and name + SCALE_SUFFIX in new.tensors
    }
    pairs = {k: v for k, v in pairs.items() if state.aliases.get(k, k) in state.specs}
    if not pairs:
        return new, {}, state.weight_program, frozenset()
    sites = quantized_sites(state.weight_program)
    tensors = dict(new.tensors)
    direct: dict[str, torch.Tensor] = {}
    given: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    for name, scale_name in pairs.items():
        fqn = state.aliases.get(name, name)
        site = next(
            (q for q in sites.get(fqn, []) if q.fmt == format_of(new.tensors[name].dtype)), None
        )
        columns = site.columns if site is not None else _by_columns(new.tensors, name)
        q = _read(tensors.pop(name))
        scale = _scales(name, scale_name, q, _read(tensors.pop(scale_name)), state, columns)
        _check_quantized(name, q)
        if site is not None:
            direct[site.q_key] = q.t() if columns else q
            direct[site.s_key] = scale
        given[fqn] = (q, scale, columns)
    program = pruned(state.weight_program, set(direct))
    for fqn, (q, scale, columns) in given.items():
        if fqn in program.inputs or fqn in state.store.tensors:  # still read as full precision
            dtype = state.engine_dtypes.get(fqn, torch.float32)
            weight = dequantize(q.t() if columns else q, scale, dtype)
            tensors[fqn] = weight.t() if columns else weight
    left = NewWeights(tensors, new.origin, new.program, new.module, new.untyped)
    return left, direct, program, frozenset(given)


def _by_columns(tensors: dict[str, Source], name: str) -> bool:
    """Where no quantized constant says how a weight is used: scaled per column if its
    scales count its columns, else per row (a square weight: per row, as compressed-tensors
    checkpoints hold a Linear's, (out, in))."""
    rows, cols = (tuple(tensors[name].shape) + (0, 0))[:2]
    scales = 1
    for size in tensors[name + SCALE_SUFFIX].shape:
        scales *= size
    return rows != cols and scales == cols


def _read(source: Source) -> torch.Tensor:
    return read_tensor(source) if isinstance(source, FileTensor) else source


def _scales(
    name: str,
    scale_name: str,
    q: torch.Tensor,
    scale: torch.Tensor,
    state: RefitState,
    columns: bool,
) -> torch.Tensor:
    """The scales as the engine holds them: float32, (out, 1)."""
    fqn = state.aliases.get(name, name)
    spec = state.specs[fqn]
    if tuple(q.shape) != spec.shape:
        raise WeightShapeError(
            f"Quantized weight {name!r} has shape {list(q.shape)}; the compiled model expects "
            f"{list(spec.shape)}. Refit with weights of the compiled architecture."
        )
    out = q.shape[1] if columns else q.shape[0]
    vector = q.dim() == 2 and scale.numel() == out and max(scale.shape, default=1) == out
    if not vector or not scale.is_floating_point() or scale.dtype in QUANTIZED_DTYPES:
        raise WeightShapeError(
            f"Scale {scale_name!r} is {scale.dtype}{list(scale.shape)}; for {name!r} "
            f"({q.dtype}{list(q.shape)}) it must hold one float per output channel: shape "
            f"[{out}] or [{out}, 1]. Give per-channel scales (per-tensor or per-group "
            "quantized checkpoints are not taken as they are: dequantize them first)."
        )
    return scale.reshape(out, 1).to(torch.float32)


def _check_quantized(name: str, q: torch.Tensor) -> None:
    """A float8_e4m3fn NaN (all of the bits but the sign set); e4m3fn has no inf."""
    if q.dtype == torch.float8_e4m3fn and bool(((q.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise WeightValueError(
            f"Quantized weight {name!r} holds NaN; nothing was written. Refit with finite "
            "weights (check the checkpoint that produced them)."
        )


_SITES: weakref.WeakKeyDictionary[WeightProgram, dict[str, list[Quantized]]] = (
    weakref.WeakKeyDictionary()
)


def quantized_sites(program: WeightProgram) -> dict[str, list[Quantized]]:
    """Source FQN -> how the weight program quantizes it (read from its graph, once)."""
    cached = _SITES.get(program)
    if cached is not None:
        return cached
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    fqns = dict(zip(placeholders, program.inputs, strict=True))
    output = next(n for n in program.graph.nodes if n.op == "output")
    keys = dict(zip(output.args[0], program.outputs, strict=True))
    sites: dict[str, list[Quantized]] = {}
    for node in program.graph.nodes:
        if node.target is not QUANTIZE_WEIGHT or node.args[0] not in fqns:
            continue
        parts = {u.args[1]: keys.get(u) for u in node.users if u.target is operator.getitem}
        if parts.get(0) is not None and parts.get(1) is not None:
            _, fmt, columns = node.args
            site = Quantized(str(fmt), bool(columns), str(parts[0]), str(parts[1]))
            sites.setdefault(fqns[node.args[0]], []).append(site)
    _SITES[program] = sites
    return sites


def pruned(program: WeightProgram, given: set[str]) -> WeightProgram:
    """`program` without the outputs `given` and whatever only they need."""
    if not given & set(program.outputs):
        return program
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    results: list[Any] = []
    for node in program.graph.nodes:
        if node.op == "output":
            results = list(node.args[0])
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    kept = [(k, env[v]) for k, v in zip(program.outputs, results, strict=True) if k not in given]
    graph.output(tuple(v for _, v in kept))
    graph.eliminate_dead_code()
    inputs = []
    for node, fqn in zip(
        [n for n in graph.nodes if n.op == "placeholder"], program.inputs, strict=True
    ):
        if node.users:
            inputs.append(fqn)
        else:
            graph.erase_node(node)
    return WeightProgram(graph, inputs, [k for k, _ in kept])


def computed_weights(state: RefitState) -> dict[str, torch.Tensor]:
    """Source FQN -> the weight a quantized engine computes with: its quantized constants
    dequantized, in the source's layout (empty for an engine without them). What eager
    PyTorch must use to give the engine's outputs (`verify`)."""
    weights = {}
    for fqn, sites in quantized_sites(state.weight_program).items():
        site = sites[0]
        store = state.store
        dtype = state.engine_dtypes.get(fqn, torch.float32)
        weight = dequantize(store[site.q_key], store[site.s_key], dtype)
        weights[fqn] = weight.t() if site.columns else weight
    return weights
