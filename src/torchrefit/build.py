"""Build: engines, fallbacks and the weight store from the partitions of a lowered program."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram

from .calls import program_signature
from .engine.base import Backend
from .errors import UnsupportedGraphError, WeightValueError
from .export import source_tensors, tied_aliases, weight_specs
from .fingerprint import describe, fingerprint, source_structure
from .lower import Lineage, LoweredProgram
from .module import (
    CompiledModule,
    DynamicDim,
    Engine,
    Fallback,
    InputGuard,
    RefitState,
    make_fallback,
)
from .partition import ENGINE, Partitioned
from .quantize import QUANTIZED_DTYPES
from .settings import Settings
from .weights import WeightStore, nonfinite

logger = logging.getLogger("torchrefit")


def build(
    source: ExportedProgram,
    program: ExportedProgram,
    lowered: LoweredProgram,
    parts: Partitioned,
    backend: Backend,
    settings: Settings,
) -> CompiledModule:
    """One engine per engine partition, a fallback per fallback partition, the weight store."""
    device = program_device(program)
    root = torch.nn.Module()
    top = parts.top
    for node in list(top.graph.nodes):
        if node.op != "call_module":
            continue
        sub = getattr(top, node.target)
        name = _child_name(parts.kinds[str(node.target)], root)
        child: Engine | Fallback
        if parts.kinds[str(node.target)] == ENGINE:
            child = _build_engine(sub, node, lowered, backend, name)
        else:
            _lift_branches(sub, node, root)
            child = _build_fallback(sub, node, lowered)
        root.add_module(name, child)
        node.target = name
        node.args = tuple(a for a in node.args if not _is_weight_arg(lowered, a))
    output_constants = _drop_weight_placeholders(top.graph, lowered)
    for attr in output_constants:
        root.register_buffer(attr, torch.empty(0), persistent=False)
    used = {k for child in root.children() for k in _constant_keys(child)} | set(
        output_constants.values()
    )
    used |= _kept_sources(source, lowered)
    used |= _state_keys(lowered)  # written by each call
    store = _initial_store(program, lowered, device, used, source_tensors(source))
    compiled = CompiledModule(root, top.graph)
    compiled._torchrefit = _refit_state(source, program, lowered, store, settings)
    compiled._torchrefit.output_constants = output_constants
    compiled._torchrefit.inf_allowed = _holding_inf(store)
    compiled.bind(store)
    return compiled


def _constant_keys(child: torch.nn.Module) -> list[str]:
    assert isinstance(child, (Engine, Fallback))
    return child.constant_keys


def _is_weight_arg(lowered: LoweredProgram, arg: Any) -> bool:
    # split_module may rename a placeholder ("input" -> "input_1"); its target keeps the name
    return (
        isinstance(arg, fx.Node)
        and arg.op == "placeholder"
        and lowered.roles[str(arg.target)].is_weight
    )


def _child_name(kind: str, root: torch.nn.Module) -> str:
    index = sum(1 for n, _ in root.named_children() if n.startswith(f"_{kind}_"))
    return f"_{kind}_{index}"


def _split_placeholders(
    sub: fx.GraphModule, call: fx.Node, lowered: LoweredProgram
) -> tuple[list[tuple[fx.Node, str]], list[fx.Node]]:
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    weights: list[tuple[fx.Node, str]] = []
    activations: list[fx.Node] = []
    for ph, arg in zip(placeholders, call.args, strict=True):
        if _is_weight_arg(lowered, arg):
            assert isinstance(arg, fx.Node)
            weights.append((ph, str(lowered.roles[str(arg.target)].key)))
        else:
            activations.append(ph)
    return weights, activations


def _build_engine(
    sub: fx.GraphModule, call: fx.Node, lowered: LoweredProgram, backend: Backend, name: str
) -> Engine:
    weights, activations = _split_placeholders(sub, call, lowered)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for ph in [w for w, _ in weights] + activations:
        env[ph] = graph.node_copy(ph)
    output = None
    for node in sub.graph.nodes:
        if node.op == "output":
            output = node
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda a: env[a])
    assert output is not None
    result = output.args[0]
    single = not isinstance(result, (tuple, list))
    graph.output(fx.node.map_arg((result,) if single else tuple(result), lambda a: env[a]))
    for ph, _ in weights:  # the store holds every constant contiguous: compile for that
        env[ph].meta["val"] = _contiguous(env[ph].meta["val"])
    gm = fx.GraphModule(torch.nn.Module(), graph)
    examples = [n.meta["val"] for n in graph.nodes if n.op == "placeholder"]
    started = time.perf_counter()
    runner = backend.build(gm, examples)
    logger.info(
        "built %s (%s, %d ops, %d constants) in %.1f s",
        name,
        backend.name,
        len(graph.nodes),
        len(weights),
        time.perf_counter() - started,
    )
    engine = Engine(backend.name, runner, [k for _, k in weights], single)
    engine.__dict__["source"] = gm  # to compile variants for exact shapes (specialize.py)
    return engine


def _contiguous(val: Any) -> Any:
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return val
    mode = detect_fake_mode([val])
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty(val.shape, dtype=val.dtype, device=val.device)


def _build_fallback(sub: fx.GraphModule, call: fx.Node, lowered: LoweredProgram) -> Fallback:
    weights, _ = _split_placeholders(sub, call, lowered)
    graph = sub.graph
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i, (ph, _) in enumerate(weights):
        sub.register_buffer(f"_w{i}", torch.empty(0), persistent=False)
        with graph.inserting_after(last_placeholder):
            attr = graph.get_attr(f"_w{i}")
        attr.meta = dict(ph.meta)
        ph.replace_all_uses_with(attr)
    for ph, _ in weights:
        graph.erase_node(ph)
    return make_fallback(graph, [k for _, k in weights])


def _lift_branches(sub: fx.GraphModule, call: fx.Node, root: torch.nn.Module) -> None:
    """The branch graphs of a fallback's torch.cond / while_loop become fallbacks of their
    own, children of the compiled module, which the top graph passes in as inputs: a
    fallback holds weights and no modules, so it saves, loads and clones as one graph."""
    top = call.graph
    for node in [n for n in sub.graph.nodes if n.op == "get_attr"]:
        branch = getattr(sub, str(node.target))
        assert isinstance(branch, fx.GraphModule), node.target  # partition keeps weights as inputs
        _refuse_nested(branch, node)
        name = _child_name("branch", root)
        root.add_module(name, make_fallback(_copied(branch.graph), []))
        last_placeholder = [n for n in sub.graph.nodes if n.op == "placeholder"][-1]
        with sub.graph.inserting_after(last_placeholder):
            placeholder = sub.graph.placeholder(name)
        node.replace_all_uses_with(placeholder)
        sub.graph.erase_node(node)
        with top.inserting_before(call):
            call.args = (*call.args, top.create_node("get_attr", name))  # root holds it
        delattr(sub, str(node.target))


def _refuse_nested(branch: fx.GraphModule, node: fx.Node) -> None:
    for inner in branch.graph.nodes:
        if inner.op in ("get_attr", "call_module"):
            ops = sorted(f"{u.name!r} (torch.ops.higher_order.{u.target})" for u in node.users)
            raise UnsupportedGraphError(
                f"The branch {node.target!r} of {', '.join(ops)} reads {inner.target!r}, a "
                "graph of its own (a torch.cond, while_loop or map nested in another's "
                "branch): torchrefit runs one level of branches. Compute the inner choice "
                "with torch.where(pred, a, b), or move the inner torch.cond out of the branch."
            )


def _copied(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def _drop_weight_placeholders(graph: fx.Graph, lowered: LoweredProgram) -> dict[str, str]:
    """Weights leave the top graph; one the model returns itself is read from the store
    (and copied on the way out). Returns graph attribute -> store key for those."""
    output_constants: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op == "placeholder" and lowered.roles[node.target].is_weight:
            if node.users:
                attr = f"_output_constant_{len(output_constants)}"
                output_constants[attr] = str(lowered.roles[node.target].key)
                if graph.owning_module is not None:
                    graph.owning_module.register_buffer(attr, torch.empty(0), persistent=False)
                with graph.inserting_before(node):
                    node.replace_all_uses_with(graph.get_attr(attr))
            graph.erase_node(node)
    return output_constants


def _kept_sources(source: ExportedProgram, lowered: LoweredProgram) -> set[str]:
    """Non-persistent inputs of the weight program: a state_dict cannot give them, so the
    store keeps their current value for refits that do not."""
    optional = {s.fqn for s in weight_specs(source).values() if not s.persistent}
    return optional & set(lowered.weight_program.inputs)


def program_device(program: ExportedProgram) -> torch.device:
    tensors = list(source_tensors(program).values())
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            tensors.append(val)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise UnsupportedGraphError(
            f"The program's weights and inputs are on several devices {sorted(map(str, devices))}; "
            "torchrefit compiles for one device. Move the model and inputs to one device, "
            "or set Settings.device."
        )
    return devices.pop() if devices else torch.device("cpu")


def _initial_store(
    program: ExportedProgram,
    lowered: LoweredProgram,
    device: torch.device,
    used: set[str],
    originals: dict[str, torch.Tensor],
) -> WeightStore:
    """The constants the partitions use, in signature order; nothing the engines never read."""
    tensors = source_tensors(program)
    derived = lowered.weight_program(tensors)
    values: dict[str, torch.Tensor] = {}
    for role in lowered.roles.values():
        if str(role.key) not in used:
            continue
        if role.kind in ("weight", "state"):
            values[str(role.key)] = tensors[str(role.key)]
        elif role.kind == "derived":
            values[str(role.key)] = derived[str(role.key)]
    store = WeightStore({k: v.detach().to(device) for k, v in values.items()})
    for key in nonfinite(_checkable(store)):
        if key in originals and bool(torch.isfinite(originals[key]).all()):
            raise WeightValueError(
                f"Weight {key!r} overflows {store[key].dtype} when the model is converted; it "
                "would be inf in the engine. Rescale it, or compile with a wider dtype."
            )
    return store


def _holding_inf(store: WeightStore) -> set[str]:
    """Constants holding inf as compiled (an attention mask's -inf): refits may keep it."""
    floats = _checkable(store)
    return {k for k in nonfinite(floats) if bool(torch.isinf(floats[k]).any())}


def _checkable(store: WeightStore) -> dict[str, torch.Tensor]:
    """Floating constants torch can check: a quantized weight's fp8 values are finite when
    its float32 scales are (a row holding inf or NaN has a scale that is not)."""
    return {
        k: v
        for k, v in store.tensors.items()
        if v.is_floating_point() and v.dtype not in QUANTIZED_DTYPES
    }


def _refit_state(
    source: ExportedProgram,
    program: ExportedProgram,
    lowered: LoweredProgram,
    store: WeightStore,
    settings: Settings,
) -> RefitState:
    specs = {s.fqn: s for s in weight_specs(source).values()}
    state_keys = _state_keys(lowered)
    lineage: dict[str, Lineage] = {}
    for key in store.keys():
        if key in lowered.derived:
            lineage[key] = lowered.derived[key]
        elif key in state_keys:
            lineage[key] = Lineage(
                "state", (key,), "a buffer the forward writes: kept across refits"
            )
        else:
            same = specs[key].dtype == str(lowered.weight_dtypes[key]).removeprefix("torch.")
            lineage[key] = Lineage("identity" if same else "cast", (key,))
    user_inputs = [n for n in lowered.placeholders() if lowered.roles[n.name].kind == "input"]
    structure = source_structure(source, with_names=True)
    return RefitState(
        settings=settings,
        fingerprint=fingerprint(structure, settings.engine_key()),
        structure=structure,
        lowered_structure=fingerprint(
            describe(lowered.gm.graph, lowered.labels()), settings.engine_key()
        ),
        specs=specs,
        aliases=tied_aliases(source, list(specs)),
        engine_dtypes=dict(lowered.weight_dtypes),
        weight_program=lowered.weight_program,
        lineage=lineage,
        store=store,
        in_spec=source.call_spec.in_spec,
        out_spec=source.call_spec.out_spec,
        guards=_guards(user_inputs, _user_inputs(source), dict(source.range_constraints)),
        lowered_order=lowered.weight_order(),
        cast_inputs_to=settings.torch_dtype if program is not source else None,
        mutations=_mutations(lowered),
        signature=program_signature(source),
    )


def _state_keys(lowered: LoweredProgram) -> set[str]:
    """Buffers the forward writes (in the graph, or after it through an output)."""
    return {str(r.key) for r in lowered.roles.values() if r.kind == "state"}


def _mutations(lowered: LoweredProgram) -> list[tuple[str, str]]:
    """("buffer", store key) or ("input", flat input index) per state write, in output order."""
    return [
        (m.kind, m.target if m.kind == "buffer" else str(lowered.roles[m.target].key))
        for m in lowered.mutations
    ]


def _guards(
    inputs: list[fx.Node], exported: list[fx.Node], ranges: dict[Any, Any]
) -> list[InputGuard]:
    """One guard per user input; dynamic dimensions with their ranges, their symbols numbered
    by first appearance (the names torch.export derives from argument names are not kept).

    A range is the exported program's: decomposition traces again with sizes assumed to be
    at least 2, but the program torch.export made is valid down to the Dim's minimum (a
    decode step's one token)."""
    symbols: dict[str, str] = {}
    guards = [_guard(n, symbols) for n in inputs]
    if len(exported) != len(guards):
        return guards
    for guard, node in zip(guards, exported, strict=True):
        val = node.meta.get("val")
        if guard.dynamic and isinstance(val, torch.Tensor) and val.dim() > max(guard.dynamic):
            for i, dim in guard.dynamic.items():
                size = val.shape[i]
                if isinstance(size, torch.SymInt) and size.node.expr in ranges:
                    low = _finite(ranges[size.node.expr].lower)
                    if low is not None and low < dim.min:
                        guard.dynamic[i] = dataclasses.replace(dim, min=low)
    return guards


def _user_inputs(source: ExportedProgram) -> list[fx.Node]:
    users = {s.arg.name for s in source.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    return [n for n in source.graph.nodes if n.op == "placeholder" and n.name in users]


def _guard(node: fx.Node, symbols: dict[str, str]) -> InputGuard:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return InputGuard(None, None, None, val)
    shape = tuple(d if isinstance(d, int) else None for d in val.shape)
    dynamic = {
        i: _dynamic_dim(d, symbols) for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt)
    }
    return InputGuard(val.dtype, val.device, shape, contiguous=_is_contiguous(val), dynamic=dynamic)


def _dynamic_dim(size: Any, symbols: dict[str, str]) -> DynamicDim:
    """A symbolic size's range (from the shape environment), example size and symbol."""
    node = size.node
    expr = node.expr
    bounds = node.shape_env.bound_sympy(expr)
    symbol = None
    if expr.is_Symbol:
        symbol = symbols.setdefault(str(expr), f"d{len(symbols)}")
    return DynamicDim(symbol, _finite(bounds.lower) or 0, _finite(bounds.upper), int(node.hint))


def _finite(bound: Any) -> int | None:
    """A range bound as an int; None for infinity (torch's int_oo)."""
    try:
        value = int(bound)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if abs(value) < 2**62 else None


def _is_contiguous(val: torch.Tensor) -> bool:
    try:
        return bool(val.is_contiguous())
    except Exception:  # noqa: BLE001 - symbolic strides that cannot be decided: assume so
        return True
