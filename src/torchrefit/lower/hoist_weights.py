"""Move computations over weights alone out of the graph, into the weight program.

A node whose inputs are all weights (directly or through other such nodes) is computed
once per refit instead of once per inference. Each value that crosses back into the
compute graph becomes a derived-weight placeholder whose lineage is the program that
computes it: recorded here, by the code that made it. Views of weights stay in the
compute graph, where they cost nothing, so a transposed weight is not copied.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ..weights import WeightProgram
from .context import Lineage, LoweredProgram, LoweringContext, Role

logger = logging.getLogger("torchrefit")


def hoist_weights(program: LoweredProgram, ctx: LoweringContext) -> LoweredProgram:
    graph = program.gm.graph
    hoisted = _weight_only_nodes(program)
    if not hoisted:
        program.weight_program = WeightProgram.empty()
        return program
    boundary = [n for n in graph.nodes if n in hoisted and any(u not in hoisted for u in n.users)]
    keys = _keys(program, boundary)
    weight_program, sources = _extract(program, hoisted, boundary, keys)
    last_placeholder = program.placeholders()[-1]
    for i, node in enumerate(boundary):
        key = keys[node]
        with graph.inserting_after(last_placeholder):
            derived = graph.placeholder(f"derived_{i}")
        derived.meta["val"] = node.meta["val"]
        last_placeholder = derived
        program.roles[derived.name] = Role("derived", key)
        note = program.notes.get(node, "weight-only computation hoisted out of the graph")
        program.derived[key] = Lineage("program", sources[node], note)
        node.replace_all_uses_with(derived, delete_user_cb=lambda u: u not in hoisted)
    for node in reversed([n for n in graph.nodes if n in hoisted]):
        graph.erase_node(node)
    program.gm.recompile()
    program.weight_program = weight_program
    logger.debug(
        "hoisted %d weight-only nodes into %d derived weights", len(hoisted), len(boundary)
    )
    return program


def _weight_only_nodes(program: LoweredProgram) -> set[fx.Node]:
    weight_only: set[fx.Node] = set()
    for node in program.gm.graph.nodes:
        role = program.role(node)
        if role is not None and role.kind == "weight":
            weight_only.add(node)
        elif node.op == "call_function" and _pure(node):
            inputs = node.all_input_nodes
            if inputs and all(i in weight_only for i in inputs):
                weight_only.add(node)
    hoisted = {n for n in weight_only if n.op == "call_function"}
    changed = True
    while changed:  # a view or a non-tensor crossing into the compute graph stays there,
        changed = False  # and so does whatever reads one that stays
        for node in list(hoisted):
            crosses = any(u not in hoisted for u in node.users)
            stays = crosses and (
                _is_view(node) or not isinstance(node.meta.get("val"), torch.Tensor)
            )
            orphaned = any(i not in hoisted and i.op != "placeholder" for i in node.all_input_nodes)
            if stays or orphaned:
                hoisted.discard(node)
                changed = True
    return hoisted


def _pure(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return (
            torch.Tag.nondeterministic_seeded not in target.tags and not target._schema.is_mutable
        )
    return target.__module__ in ("_operator", "operator")


def _is_view(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _keys(program: LoweredProgram, boundary: list[fx.Node]) -> dict[fx.Node, str]:
    """Store keys of derived weights: the name the making pass asked for, else the node's."""
    keys: dict[fx.Node, str] = {}
    taken: set[str] = set()
    for node in boundary:
        key = program.names.get(node, f"~{node.name}")
        while key in taken:
            key += "'"
        keys[node] = key
        taken.add(key)
    return keys


def _extract(
    program: LoweredProgram,
    hoisted: set[fx.Node],
    boundary: list[fx.Node],
    keys: dict[fx.Node, str],
) -> tuple[WeightProgram, dict[fx.Node, tuple[str, ...]]]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []
    sources: dict[fx.Node, set[str]] = {}
    for node in program.gm.graph.nodes:
        if node not in hoisted:
            continue
        for arg in node.all_input_nodes:
            if arg not in env and arg not in hoisted:
                fqn = str(program.roles[arg.name].key)
                env[arg] = graph.placeholder(f"w{len(inputs)}")
                env[arg].meta["val"] = arg.meta["val"]
                inputs.append(fqn)
                sources[arg] = {fqn}
        env[node] = graph.node_copy(node, lambda a: env[a])
        sources[node] = set().union(*(sources[a] for a in node.all_input_nodes))
    graph.output(tuple(env[b] for b in boundary))
    outputs = [keys[b] for b in boundary]
    return WeightProgram(graph, inputs, outputs), {b: tuple(sorted(sources[b])) for b in boundary}
