"""Structural fingerprints: ops, edges, shapes, dtypes and engine settings; never values."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram

from .errors import IncompatibleWeightsError
from .export import weight_specs
from .tables import DTYPES


def describe(graph: fx.Graph, placeholder_labels: dict[str, str]) -> list[str]:
    """One line per node; edges as node indices, so names do not matter unless labelled.
    Shape symbols are numbered by first appearance: the names torch.export derives from
    `forward`'s argument names are not structure."""
    return canonical_symbols(_describe(graph, placeholder_labels))


_SYMBOL = re.compile(r"\b[su]\d+\b")


def canonical_symbols(lines: list[str]) -> list[str]:
    if not _SYMBOL.search("\n".join(lines)):  # a static graph: one scan, nothing to rename
        return lines
    names = _symbol_names(lines)
    return [_SYMBOL.sub(lambda m: names[m.group(0)], line) for line in lines]


def _symbol_names(lines: list[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for line in lines:
        for symbol in _SYMBOL.findall(line):
            names.setdefault(symbol, f"d{len(names)}")
    return names


def dynamic_ranges(ep: ExportedProgram) -> list[str]:
    """The value range of each dynamic dimension, by canonical symbol: what an engine was
    compiled to accept (part of the cache key, not of the weights' structure)."""
    names = _symbol_names(_describe(ep.graph, {}))
    return sorted(
        f"range {names.get(str(symbol), str(symbol))} [{bounds.lower}, {bounds.upper}]"
        for symbol, bounds in ep.range_constraints.items()
    )


def _describe(graph: fx.Graph, placeholder_labels: dict[str, str]) -> list[str]:
    index = {node: i for i, node in enumerate(graph.nodes)}
    lines = []
    for node in graph.nodes:
        if node.op == "placeholder":
            head = f"input {placeholder_labels.get(node.name, 'user')}"
        elif node.op == "output":
            head = f"output {_args(node.args, index)}"
        else:
            call = f"{_args(node.args, index)}{_kwargs(node.kwargs, index)}"
            head = f"{node.op} {_target(node.target)}{call}"
        lines.append(f"{head} -> {_meta(node.meta.get('val'))}")
        branch = _branch(graph, node)
        if branch is not None:  # a torch.cond / while_loop branch: its ops are structure too
            lines.extend(f"  {line}" for line in _describe(branch.graph, {}))
    return lines


def _branch(graph: fx.Graph, node: fx.Node) -> fx.GraphModule | None:
    if node.op != "get_attr" or graph.owning_module is None:
        return None
    value = getattr(graph.owning_module, str(node.target), None)
    return value if isinstance(value, fx.GraphModule) else None


def fingerprint(lines: list[str], settings_key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings_key, sort_keys=True).encode())
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def source_labels(ep: ExportedProgram, with_names: bool) -> dict[str, str]:
    """Placeholder labels of an exported program: weight kind, and its FQN when names count."""
    return {
        name: f"{spec.kind}:{spec.fqn}" if with_names else spec.kind
        for name, spec in weight_specs(ep).items()
    }


def source_structure(ep: ExportedProgram, with_names: bool) -> list[str]:
    """The node descriptors of an exported program (weight FQNs included when asked)."""
    return describe(ep.graph, source_labels(ep, with_names))


def source_fingerprint(ep: ExportedProgram, settings_key: dict[str, Any]) -> str:
    """What the fast path compares: structure, weight names and engine settings."""
    return fingerprint(source_structure(ep, with_names=True), settings_key)


def strip_name(line: str) -> str:
    """A descriptor line without the weight FQN its placeholder carries."""
    if not line.startswith("input "):
        return line
    head, _, rest = line.partition(" -> ")
    return f"{head.split(':')[0]} -> {rest}"


def first_difference(
    compiled: list[str], new: list[str], compiled_names: list[str] | None = None
) -> str:
    for i, (old_line, new_line) in enumerate(zip(compiled, new, strict=False)):
        if old_line != new_line:
            name = f" ({compiled_names[i]!r})" if compiled_names and i < len(compiled_names) else ""
            return f"node {i}{name}: compiled `{old_line}`, new `{new_line}`"
    if len(compiled) != len(new):
        return f"the compiled program has {len(compiled)} nodes, the new one {len(new)}"
    return "none"


def raise_incompatible(compiled: list[str], new: list[str], names: list[str] | None = None) -> None:
    raise IncompatibleWeightsError(
        "The new weights come from another architecture; first difference at "
        f"{first_difference(compiled, new, names)}. Refit only with weights of the compiled "
        "architecture, or compile the new model."
    )


def _target(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__qualname__", str(target))


def _args(args: Any, index: dict[fx.Node, int]) -> str:
    return "(" + ", ".join(_arg(a, index) for a in args) + ")"


def _kwargs(kwargs: dict[str, Any], index: dict[fx.Node, int]) -> str:
    if not kwargs:
        return ""
    return "{" + ", ".join(f"{k}={_arg(v, index)}" for k, v in sorted(kwargs.items())) + "}"


def _arg(arg: Any, index: dict[fx.Node, int]) -> str:
    if isinstance(arg, fx.Node):
        return f"%{index[arg]}"
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_arg(a, index) for a in arg) + "]"
    return repr(arg)


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _meta(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_DTYPE_NAMES[val.dtype]}{list(val.shape)}"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_meta(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "-"
