"""Split a lowered graph into engine partitions and PyTorch fallback partitions.

Partitions are maximal runs of the graph's topological order with one label. A run of a
topological order is convex (every path between two of its nodes stays inside it), so
fusing it never creates a cycle.

Higher-order ops (torch.cond, while_loop) always run in PyTorch: an engine is one flat
graph, and their branches are graphs of their own, run by PyTorch with the weights the
fallback passes them. The backend refuses whatever else it cannot build (Inductor: values
whose sizes depend on the data).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from .settings import Settings

logger = logging.getLogger("torchrefit")

ENGINE, FALLBACK = "engine", "fallback"


@dataclass(frozen=True)
class Capability:
    """Which nodes an engine may run: the backend's support, less torch_executed_ops."""

    torch_executed_ops: frozenset[str]
    backend_supports: Callable[[fx.Node], bool]

    def label(self, node: fx.Node) -> str | None:
        """ENGINE, FALLBACK, or None for nodes that go with their neighbours."""
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return FALLBACK
        if not isinstance(target, torch._ops.OpOverload):
            return None if self.backend_supports(node) else FALLBACK
        if (
            str(target) in self.torch_executed_ops
            or target.name().replace("::", ".") in self.torch_executed_ops
        ):
            return FALLBACK
        return ENGINE if self.backend_supports(node) else FALLBACK


@dataclass
class Partitioned:
    top: fx.GraphModule  # calls one submodule per partition
    kinds: dict[str, str]  # submodule name -> ENGINE or FALLBACK


def partition(gm: fx.GraphModule, settings: Settings, capability: Capability) -> Partitioned:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    labels = _labels(nodes, capability)
    _warn_unmatched(nodes, settings.torch_executed_ops)
    runs = _runs(nodes, labels)
    runs = _merge(_apply_min_block_size(runs, settings.min_block_size))
    run_of = {node: i for i, (_, members) in enumerate(runs) for node in members}
    top = split_module(gm, None, lambda n: run_of[n], keep_original_order=True)  # type: ignore[arg-type]
    kinds = {f"submod_{i}": label for i, (label, _) in enumerate(runs)}
    logger.debug(
        "partitioned into %d engine and %d fallback partitions",
        sum(k == ENGINE for k in kinds.values()),
        sum(k == FALLBACK for k in kinds.values()),
    )
    return Partitioned(top, kinds)


def _warn_unmatched(nodes: list[fx.Node], ops: frozenset[str]) -> None:
    present = set()
    for node in nodes:
        if isinstance(node.target, torch._ops.OpOverload):
            present |= {str(node.target), node.target.name().replace("::", ".")}
    for op in sorted(ops - present):
        logger.warning(
            "torch_executed_ops: %s matches no op of the lowered graph (ops such as aten.linear "
            "are decomposed, into aten.addmm and aten.permute); it keeps nothing in PyTorch",
            op,
        )


def _labels(nodes: list[fx.Node], capability: Capability) -> list[str]:
    labels: list[str] = []
    by_node: dict[fx.Node, str] = {}
    for node in nodes:
        label = capability.label(node)
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            label = by_node.get(node.args[0], label)
        if label is None:
            label = labels[-1] if labels else ENGINE
        by_node[node] = label
        labels.append(label)
    return labels


Run = tuple[str, list[fx.Node]]


def _runs(nodes: list[fx.Node], labels: list[str]) -> list[Run]:
    runs: list[Run] = []
    for node, label in zip(nodes, labels, strict=True):
        if runs and runs[-1][0] == label:
            runs[-1][1].append(node)
        else:
            runs.append((label, [node]))
    return runs


def _compute_ops(members: list[fx.Node]) -> int:
    return sum(
        isinstance(n.target, torch._ops.OpOverload) and not n.target.is_view for n in members
    )


def _apply_min_block_size(runs: list[Run], min_block_size: int) -> list[Run]:
    return [
        (FALLBACK if label == ENGINE and _compute_ops(members) < min_block_size else label, members)
        for label, members in runs
    ]


def _merge(runs: list[Run]) -> list[Run]:
    merged: list[Run] = []
    for label, members in runs:
        if merged and merged[-1][0] == label:
            merged[-1][1].extend(members)
        else:
            merged.append((label, list(members)))
    return merged
