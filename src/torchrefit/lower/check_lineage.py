"""Every constant an engine will hold must have a recorded lineage (invariant 2)."""

from __future__ import annotations

import torch.fx as fx

from ..errors import LineageError
from .context import LoweredProgram, LoweringContext


def check_lineage(program: LoweredProgram, ctx: LoweringContext) -> LoweredProgram:
    for node in program.gm.graph.nodes:
        if node.op == "get_attr" and not _is_branch(program.gm, node):
            raise LineageError(
                f"Node {node.name!r} reads the attribute {node.target!r}, which is not a "
                "weight of the graph signature, so a refit could not update it. Make it a "
                "parameter or buffer of the model, or compile with immutable_weights=True "
                "and without refits."
            )
        if node.op != "placeholder":
            continue
        role = program.roles.get(node.name)
        if role is None:
            raise LineageError(
                f"Placeholder {node.name!r} was added by a lowering pass without a role; "
                "this is a bug in that pass."
            )
        if role.kind == "derived" and role.key not in program.derived:
            raise LineageError(
                f"Derived weight {role.key!r} (placeholder {node.name!r}) has no recorded "
                "lineage; a refit could not recompute it. This is a bug in the pass that made it."
            )
    return program


def _is_branch(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A torch.cond or while_loop branch: a graph, whose weights export passes in as inputs."""
    return isinstance(getattr(gm, str(node.target), None), fx.GraphModule)
