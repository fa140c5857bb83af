"""fx graphs of aten ops as JSON data, and back, without running or unpickling code.

Targets resolve only to `torch.ops.*` overloads, functions of the `operator` module and
`torch.sym_*` functions; anything else is refused.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .errors import UnsupportedGraphError

_SCALARS = (bool, int, float, str, type(None))
_ENUMS: dict[str, type] = {
    "dtype": torch.dtype,
    "layout": torch.layout,
    "memory_format": torch.memory_format,
}


def target_name(target: Any) -> str:
    """A stable, resolvable name for a call_function target."""
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target}"
    name = getattr(target, "__name__", "")
    if getattr(operator, name, None) is target:
        return f"operator.{name}"
    if name.startswith(("sym_", "_sym_")) and getattr(torch, name, None) is target:
        return f"torch.{name}"
    raise UnsupportedGraphError(
        f"Graph call target {target!r} is not an aten op, an operator function or a "
        "torch.sym_* function, so it cannot be stored as data. Keep such code out of the "
        "exported model, or compile without saving."
    )


def resolve_target(name: str) -> Any:
    if name.startswith("torch.ops."):
        namespace, op, overload = name.removeprefix("torch.ops.").split(".")
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    if name.startswith("operator."):
        return getattr(operator, name.removeprefix("operator."))
    if name.startswith("torch.") and name.removeprefix("torch.").lstrip("_").startswith("sym_"):
        return getattr(torch, name.removeprefix("torch."))
    raise UnsupportedGraphError(f"Stored graph names the call target {name!r}, which is refused.")


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


def decode_arg(data: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(data, _SCALARS):
        return data
    ((kind, value),) = data.items()
    if kind == "node":
        return env[value]
    if kind in ("list", "tuple"):
        items = [decode_arg(v, env) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "device":
        return torch.device(value)
    if kind in _ENUMS:
        result = getattr(torch, value, None)
        if not isinstance(result, _ENUMS[kind]):
            raise UnsupportedGraphError(f"Stored graph names an unknown {kind} {value!r}.")
        return result
    if kind == "slice":
        return slice(*(decode_arg(v, env) for v in value))
    raise UnsupportedGraphError(f"Stored graph holds an argument of unknown kind {kind!r}.")


def graph_to_json(graph: fx.Graph) -> list[dict[str, Any]]:
    nodes = []
    for node in graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = target_name(node.target)
        elif node.op in ("call_module", "get_attr"):
            entry["target"] = node.target
        entry["args"] = encode_arg(tuple(node.args))
        entry["kwargs"] = {k: encode_arg(v) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return nodes


def graph_from_json(nodes: list[dict[str, Any]]) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in nodes:
        op = entry["op"]
        args = decode_arg(entry["args"], env)
        kwargs = {k: decode_arg(v, env) for k, v in entry["kwargs"].items()}
        if op not in ("placeholder", "output", "call_function", "call_module", "get_attr"):
            raise UnsupportedGraphError(f"Stored graph holds a node of unknown op {op!r}.")
        if op == "call_function":
            target: Any = resolve_target(entry["target"])
        elif op in ("placeholder", "output"):
            target = entry["name"] if op == "placeholder" else "output"
        else:
            target = entry["target"]
        node = graph.create_node(op, target, args, kwargs, name=entry["name"])
        env[entry["name"]] = node
    graph.lint()
    return graph
