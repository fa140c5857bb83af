"""Decompose to core ATen and give every placeholder its role."""

from __future__ import annotations

import torch
from torch._export.verifier import SpecViolationError
from torch.export import ExportedProgram

from ..errors import UnsupportedGraphError
from ..export import TRACING, mutations, weight_specs
from .context import LoweredProgram, Role


def decompose(ep: ExportedProgram) -> LoweredProgram:
    with TRACING:
        try:
            ep = ep.run_decompositions(_decomposition_table())
        except SpecViolationError as exc:  # export keeps it, its own verifier refuses it
            raise UnsupportedGraphError(
                f"The exported forward writes state where torchrefit cannot compile it ({exc}):"
                " most often a buffer written inside a torch.cond or while_loop branch. Return "
                "the new value from every branch and write it after the call: `y, n = "
                "torch.cond(pred, f, g, (x, self.n)); self.n.copy_(n)`."
            ) from exc
    writes = mutations(ep)  # after decomposition, which reveals them
    state = {m.target for m in writes if m.kind == "buffer"}
    specs = weight_specs(ep)
    roles: dict[str, Role] = {}
    inputs = 0
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in specs:
            fqn = specs[node.name].fqn
            roles[node.name] = Role("state" if fqn in state else "weight", fqn)
        else:
            roles[node.name] = Role("input", inputs)
            inputs += 1
    dtypes = {s.fqn: node_dtype for s, node_dtype in _dtypes(ep, specs)}
    return LoweredProgram(ep.graph_module, roles, dtypes, mutations=writes)


def _dtypes(ep: ExportedProgram, specs: dict) -> list:
    return [
        (specs[n.name], n.meta["val"].dtype)
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in specs
    ]


# Ops kept whole: Inductor lowers them to fused kernels (flash attention on CUDA), and
# decomposing attention on CPU can trace strides its math decomposition does not give.
KEPT_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)


def _decomposition_table():
    table = torch.export.default_decompositions()
    for op in KEPT_OPS:
        table.pop(op, None)
    return table
