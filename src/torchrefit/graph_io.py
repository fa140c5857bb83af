"""fx graphs of aten ops as JSON data, and back, without running or unpickling code.

Names are validated plain identifiers (fx pastes them into the code it generates), and
targets resolve only to aten and prims op overloads, torchrefit's quantized-weight ops
(`quantize/ops.py`), arithmetic functions of `operator`, `torch.sym_*` functions and the
higher-order ops cond, while_loop and map (whose bodies are inputs of the graph, never
stored code); anything else is refused before any code is generated.
"""

from __future__ import annotations

import keyword
import operator
import re
from typing import Any

import torch
import torch.fx as fx

from .errors import SettingsError, UnsupportedGraphError
from .quantize import OPS as TORCHREFIT_OPS  # registers them: a stored graph may call them
from .tables import DTYPES, LAYOUTS, MEMORY_FORMATS, parse_device

_SCALARS = (bool, int, float, str, type(None))
_ENUMS: dict[str, type] = {
    "dtype": torch.dtype,
    "layout": torch.layout,
    "memory_format": torch.memory_format,
}
_ENUM_NAMES: dict[str, dict[str, Any]] = {
    "dtype": DTYPES,
    "layout": LAYOUTS,
    "memory_format": MEMORY_FORMATS,
}
_OPS = ("placeholder", "output", "call_function", "call_module", "get_attr")

# The pure functions a stored graph may call besides torch.ops overloads: never attrgetter,
# methodcaller, call or anything else that reaches further.
OPERATOR_TARGETS = frozenset(
    {
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
        "lshift",
        "rshift",
        "matmul",
        "truth",
    }
)
SYM_TARGETS = frozenset(
    {
        "sym_float",
        "sym_int",
        "sym_ite",
        "sym_max",
        "sym_min",
        "sym_not",
        "sym_sqrt",
        "sym_sum",
    }
)
OP_NAMESPACES = frozenset({"aten", "prims"})
# Higher-order ops a fallback may call: their branch graphs are arguments (other fallbacks
# of the module), so a stored graph names no code beyond the op itself.
HIGHER_ORDER_TARGETS = frozenset({"cond", "while_loop", "map_impl"})
MAX_DEPTH = 32  # nesting of stored arguments
MAX_NODES = 1_000_000
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")


def check_name(name: Any, what: str = "node name") -> str:
    """A stored name becomes an identifier in code fx generates: only plain identifiers
    (no keywords, no dunders) are taken, so no stored string can become code."""
    if (
        not isinstance(name, str)
        or not _NAME.fullmatch(name)
        or keyword.iskeyword(name)
        or name.startswith("__")
    ):
        raise UnsupportedGraphError(
            f"Stored graph has the {what} {name!r}, which is not a plain identifier; the file "
            "was changed or corrupted. Save the module again."
        )
    return name


def check_attribute(target: Any) -> str:
    """A get_attr or call_module target: dotted plain identifiers."""
    if not isinstance(target, str):
        check_name(target, "attribute")
    for part in str(target).split("."):
        check_name(part, "attribute")
    return str(target)


def target_name(target: Any) -> str:
    """A stable, resolvable name for a call_function target."""
    if isinstance(target, torch._ops.OpOverload):
        name = f"torch.ops.{target}"
        resolve_target(name)  # what save writes, load takes
        return name
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() in HIGHER_ORDER_TARGETS:
            return f"torch.ops.higher_order.{target.name()}"
        raise UnsupportedGraphError(
            f"Graph calls the higher-order op torch.ops.higher_order.{target.name()}, which "
            f"cannot be stored as data (only {sorted(HIGHER_ORDER_TARGETS)} can). Compile the "
            "model where you run it (torchrefit.compile) instead of saving it, or write that "
            "part with torch.cond or torch.ops.higher_order.while_loop."
        )
    name = getattr(target, "__name__", "")
    if name in OPERATOR_TARGETS and getattr(operator, name, None) is target:
        return f"operator.{name}"
    if name in SYM_TARGETS and getattr(torch, name, None) is target:
        return f"torch.{name}"
    raise UnsupportedGraphError(
        f"Graph call target {target!r} is not an aten op, an arithmetic operator or a "
        "torch.sym_* function, so it cannot be stored as data. Keep such code out of the "
        "exported model, or compile without saving."
    )


def resolve_target(name: Any) -> Any:
    """The function a stored target names, from the allow-list only."""
    if isinstance(name, str) and name.startswith("torch.ops.higher_order."):
        if name.removeprefix("torch.ops.higher_order.") in HIGHER_ORDER_TARGETS:
            return getattr(torch.ops.higher_order, name.removeprefix("torch.ops.higher_order."))
    elif isinstance(name, str) and name.startswith("torch.ops."):
        parts = name.removeprefix("torch.ops.").split(".")
        ours = parts[0] == "torchrefit" and len(parts) == 3 and parts[1] in TORCHREFIT_OPS
        allowed = parts[0] in OP_NAMESPACES or ours
        if len(parts) == 3 and allowed and all(_NAME.fullmatch(p) for p in parts):
            packet = getattr(getattr(torch.ops, parts[0]), parts[1], None)
            overload = getattr(packet, parts[2], None) if packet is not None else None
            if isinstance(overload, torch._ops.OpOverload):
                return overload
    elif isinstance(name, str) and name.startswith("operator."):
        if name.removeprefix("operator.") in OPERATOR_TARGETS:
            return getattr(operator, name.removeprefix("operator."))
    elif isinstance(name, str) and name.removeprefix("torch.") in SYM_TARGETS:
        return getattr(torch, name.removeprefix("torch."))
    raise UnsupportedGraphError(
        f"Stored graph names the call target {str(name)[:80]!r}, which is refused: only aten "
        "and prims op overloads, torchrefit's quantized-weight ops, arithmetic operators, "
        "torch.sym_* functions and "
        f"torch.ops.higher_order {sorted(HIGHER_ORDER_TARGETS)} are taken."
    )


def encode_arg(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        return {"node": arg.name}
    if isinstance(arg, _SCALARS):
        return arg
    if isinstance(arg, (list, tuple)):
        return {"tuple" if isinstance(arg, tuple) else "list": [encode_arg(a) for a in arg]}
    if isinstance(arg, torch.device):
        return {"device": str(arg)}
    for kind, cls in _ENUMS.items():
        if isinstance(arg, cls):
            return {kind: str(arg).removeprefix("torch.")}
    if isinstance(arg, slice):
        return {"slice": [encode_arg(arg.start), encode_arg(arg.stop), encode_arg(arg.step)]}
    raise UnsupportedGraphError(
        f"Graph argument {arg!r} of type {type(arg).__name__} cannot be stored as data."
    )


def decode_arg(data: Any, env: dict[str, fx.Node], depth: int = 0) -> Any:
    if isinstance(data, _SCALARS):
        return data
    if depth > MAX_DEPTH:
        raise UnsupportedGraphError(f"Stored graph nests arguments deeper than {MAX_DEPTH}.")
    if not isinstance(data, dict) or len(data) != 1:
        raise UnsupportedGraphError(f"Stored graph holds a malformed argument {str(data)[:80]!r}.")
    ((kind, value),) = data.items()
    if kind == "node":
        if not isinstance(value, str) or value not in env:
            raise UnsupportedGraphError(
                f"Stored graph refers to {str(value)[:80]!r}, no earlier node."
            )
        return env[value]
    if kind in ("list", "tuple") and isinstance(value, list):
        items = [decode_arg(v, env, depth + 1) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "device" and isinstance(value, str):
        try:
            return parse_device(value)
        except SettingsError as exc:
            raise UnsupportedGraphError(f"Stored graph names a device: {exc}") from exc
    if kind in _ENUM_NAMES and isinstance(value, str):
        if value not in _ENUM_NAMES[kind]:  # a table, never getattr(torch, name): no imports
            raise UnsupportedGraphError(
                f"Stored graph names a {kind} {value[:80]!r}, no torch {kind}."
            )
        return _ENUM_NAMES[kind][value]
    if kind == "slice" and isinstance(value, list) and len(value) == 3:
        return slice(*(decode_arg(v, env, depth + 1) for v in value))
    raise UnsupportedGraphError(
        f"Stored graph holds an argument of unknown kind {str(kind)[:40]!r}."
    )


def graph_to_json(graph: fx.Graph) -> list[dict[str, Any]]:
    nodes = []
    for node in graph.nodes:
        entry: dict[str, Any] = {"name": check_name(node.name), "op": node.op}
        if node.op == "call_function":
            entry["target"] = target_name(node.target)
        elif node.op in ("call_module", "get_attr"):
            entry["target"] = check_attribute(node.target)
        elif node.op == "placeholder" and node.target != node.name:
            check_name(node.target, "placeholder")
        entry["args"] = encode_arg(tuple(node.args))
        entry["kwargs"] = {check_name(k, "keyword"): encode_arg(v) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return nodes


def graph_from_json(nodes: Any) -> fx.Graph:
    """The graph, built only from validated names and allow-listed targets: no stored string
    reaches generated code unchecked. Anything malformed raises UnsupportedGraphError."""
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        raise UnsupportedGraphError("Stored graph is not a list of nodes.")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for index, entry in enumerate(nodes):
        node = _node_from_json(graph, env, entry, index)
        env[node.name] = node
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001 - fx's lint raises several types
        raise UnsupportedGraphError(f"Stored graph is inconsistent ({exc}).") from exc
    return graph


def _node_from_json(graph: fx.Graph, env: dict[str, fx.Node], entry: Any, index: int) -> fx.Node:
    if not isinstance(entry, dict) or not isinstance(entry.get("kwargs", {}), dict):
        raise UnsupportedGraphError(f"Stored graph node {index} is malformed.")
    op, name = entry.get("op"), check_name(entry.get("name"))
    if op not in _OPS:
        raise UnsupportedGraphError(f"Stored graph node {name!r} has unknown op {str(op)[:40]!r}.")
    if name in env:
        raise UnsupportedGraphError(f"Stored graph names two nodes {name!r}.")
    args = decode_arg(entry.get("args", {"tuple": []}), env)
    if not isinstance(args, tuple):
        raise UnsupportedGraphError(f"Stored graph node {name!r} has malformed arguments.")
    kwargs = {
        check_name(k, "keyword"): decode_arg(v, env) for k, v in entry.get("kwargs", {}).items()
    }
    target: Any
    if op == "call_function":
        target = resolve_target(entry.get("target"))
    elif op == "placeholder":
        target = name
    elif op == "output":
        target = "output"
    else:
        target = check_attribute(entry.get("target"))
    node = graph.create_node(op, target, args, kwargs, name=name)
    if node.name != name:  # fx renamed it (a clash with a builtin): references would break
        raise UnsupportedGraphError(f"Stored graph node name {name!r} is reserved.")
    return node
