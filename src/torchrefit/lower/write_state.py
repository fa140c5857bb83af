"""Buffer writes inside the graph: `copy_(buffer, new value)` at its end, not an output.

Decomposition turns a forward's in-place buffer update (a KV cache's `index_copy_`, a
counter's `add_`) into a new value returned as an extra output. Returned, the whole buffer
is materialized and then copied into the store after every call: for a KV cache, three full
copies of the cache per decoded token. Written back in the graph instead, Inductor updates
the buffer in place (it re-inplaces the scatter into the input it mutates), and a CUDA graph
replays the update too. The copy is the graph's last op, so every read of the buffer's old
value comes before it in the partitions' order.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import LoweredProgram, LoweringContext


def write_state(program: LoweredProgram, ctx: LoweringContext) -> LoweredProgram:
    writes = [m for m in program.mutations if m.kind == "buffer"]
    if not writes:
        return program
    graph = program.gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    values = list(output.args[0])
    placeholders = {
        str(role.key): node
        for node in program.placeholders()
        if (role := program.roles[node.name]).kind == "state"
    }
    kept_values, kept = [], []
    for index, mutation in enumerate(program.mutations):
        value = values[index]
        buffer = placeholders.get(mutation.target)
        if mutation.kind != "buffer" or buffer is None or not isinstance(value, fx.Node):
            kept_values.append(value)
            kept.append(mutation)
            continue
        if value is not buffer:
            with graph.inserting_before(output):
                copy = graph.call_function(torch.ops.aten.copy_.default, (buffer, value))
            copy.meta["val"] = buffer.meta["val"]
    user = values[len(program.mutations) :]
    output.args = (tuple(kept_values + user),)
    graph.lint()
    program.gm.recompile()
    program.mutations = kept
    return program
