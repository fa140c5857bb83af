"""Quantized linear layers: weights held as fp8 or int8 plus one float32 scale per output
channel, derived constants re-quantized from full precision on every refit.

With `Settings.quantize` set, every matrix product whose right operand is a weight (after
decomposition a Linear is `addmm(bias, x, permute(W))` or `mm(x, permute(W))`; GPT-2's
Conv1D is `addmm(bias, x, W)` with W stored (in, out)) reads two new derived constants in
place of W: q (the quantized weight, held (out, in)) and s (its scales, (out, 1)), outputs of
the weight program's `torchrefit::quantize_weight` over W's source. W itself stays where
something else reads it (a tied embedding's lookup) and leaves the store otherwise.

This pass runs after hoisting, so q and s are the boundary: the dequantization stays in the
compute graph, where it is fused into the product, and never becomes a stored constant. On
CPU the graph dequantizes and multiplies (aten ops); on CUDA it calls `torchrefit::quant_mm`,
whose products of one row `Backend.specialize` rewrites into aten ops Inductor fuses.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..quantize import FORMATS, QUANT_MM, QUANTIZE_WEIGHT
from ..weights import WeightProgram
from .context import Lineage, LoweredProgram, LoweringContext, Role, add_node

logger = logging.getLogger("torchrefit")
aten = torch.ops.aten
_TRANSPOSES = (aten.permute.default, aten.t.default)
KERNEL_DEVICES = ("cuda",)  # where products call quant_mm (its Triton kernel) rather than aten
_SWAP = ([1, 0], (1, 0), [1, -2], [-1, 0], [-1, -2])  # permutations swapping two dimensions


@dataclass(frozen=True)
class Site:
    """A matrix product reading `weight` (a placeholder) as its right operand; `columns`:
    the weight is used as stored, (in, out), rather than transposed."""

    node: fx.Node
    weight: fx.Node
    columns: bool


@dataclass(frozen=True)
class Made:
    """The derived constants of one weight in one orientation."""

    q: fx.Node
    s: fx.Node
    source: str  # the store key of the full-precision weight
    columns: bool


def quantize(program: LoweredProgram, ctx: LoweringContext) -> LoweredProgram:
    fmt = ctx.settings.quantize
    if fmt is None:
        return program
    sites = [site for node in program.gm.graph.nodes if (site := _site(program, node))]
    made: dict[tuple[str, bool], Made] = {}
    for site in sites:
        key = (str(program.roles[site.weight.name].key), site.columns)
        if key not in made:
            made[key] = _constants(program, site, fmt, made)
        _replace(program, site, made[key])
    if not sites:
        return program
    program.gm.graph.eliminate_dead_code()
    dropped = _drop_unused_derived(program)
    program.weight_program = _extended(program.weight_program, program, made, fmt, dropped)
    program.gm.graph.lint()
    program.gm.recompile()
    logger.debug("quantized %d weights (%s) read by %d products", len(made), fmt, len(sites))
    return program


def _site(program: LoweredProgram, node: fx.Node) -> Site | None:
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
        return None
    if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return None
    operand = node.args[-1]
    if not isinstance(operand, fx.Node):
        return None
    columns = not (operand.op == "call_function" and operand.target in _TRANSPOSES)
    if not columns and operand.target is aten.permute.default and operand.args[1] not in _SWAP:
        return None
    weight = operand if columns else operand.args[0]
    if not isinstance(weight, fx.Node):
        return None
    role = program.role(weight)
    if role is None or role.kind not in ("weight", "derived"):
        return None
    val = weight.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or not val.is_floating_point():
        return None
    return Site(node, weight, columns)


def _constants(
    program: LoweredProgram, site: Site, fmt: str, made: dict[tuple[str, bool], Made]
) -> Made:
    """Placeholders for q and s of the site's weight, with their roles and lineage."""
    source = str(program.roles[site.weight.name].key)
    taken = {str(r.key) for r in program.roles.values()}
    q_key, s_key = f"~{fmt}:{source}", f"~{fmt}_scale:{source}"
    while q_key in taken or s_key in taken:  # the same weight in both orientations
        q_key, s_key = q_key + "'", s_key + "'"
    fake_q, fake_s = _fake(site.weight.meta["val"], fmt, site.columns)
    graph = program.gm.graph
    last = program.placeholders()[-1]
    with graph.inserting_after(last):
        q = graph.placeholder(f"quantized_{len(made)}")
    with graph.inserting_after(q):
        s = graph.placeholder(f"scale_{len(made)}")
    q.meta["val"], s.meta["val"] = fake_q, fake_s
    role = program.roles[site.weight.name]
    sources = (source,) if role.kind == "weight" else program.derived[source].sources
    layout = "used as stored (in, out); held (out, in)" if site.columns else "(out, in)"
    program.roles[q.name] = Role("derived", q_key)
    program.roles[s.name] = Role("derived", s_key)
    program.derived[q_key] = Lineage(
        "program",
        sources,
        f"quantized {fmt} ({str(FORMATS[fmt][0]).removeprefix('torch.')}) weight of "
        f"{source!r}, {layout}, scales in {s_key!r}; re-quantized from it on every refit",
    )
    program.derived[s_key] = Lineage(
        "program", sources, f"float32 scales of {q_key!r}, one per output channel"
    )
    return Made(q, s, source, site.columns)


def _fake(val: torch.Tensor, fmt: str, columns: bool) -> tuple[Any, Any]:
    mode = detect_fake_mode([val])
    assert mode is not None, "lowered graphs carry fake values"
    with mode:
        return QUANTIZE_WEIGHT(val, fmt, columns)


def _replace(program: LoweredProgram, site: Site, made: Made) -> None:
    """The product reads q and s: quant_mm on CUDA, else dequantize-then-multiply."""
    graph, node = program.gm.graph, site.node
    dtype = site.weight.meta["val"].dtype
    bias = node.args[0] if node.target is aten.addmm.default else None
    x = node.args[-2]
    with graph.inserting_before(node):
        if site.weight.meta["val"].device.type in KERNEL_DEVICES and _vector_bias(bias, made):
            new = add_node(graph, QUANT_MM, (x, made.q, made.s, bias))
        else:
            weight = add_node(graph, aten._to_copy.default, (made.q,), {"dtype": torch.float32})
            weight = add_node(graph, aten.mul.Tensor, (weight, made.s))
            if dtype != torch.float32:
                weight = add_node(graph, aten._to_copy.default, (weight,), {"dtype": dtype})
            operand = add_node(graph, aten.permute.default, (weight, [1, 0]))
            new = add_node(graph, node.target, (*node.args[:-1], operand), dict(node.kwargs))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _vector_bias(bias: Any, made: Made) -> bool:
    """quant_mm takes no bias or one value per output channel (addmm also broadcasts others)."""
    if bias is None:
        return True
    val = bias.meta.get("val") if isinstance(bias, fx.Node) else None
    rows = made.q.meta["val"].shape[0]
    return isinstance(val, torch.Tensor) and val.dim() == 1 and val.shape[0] == rows


def _drop_unused_derived(program: LoweredProgram) -> set[str]:
    """Hoisted constants only the quantized products read: no longer stored (q and s are
    computed from them in the weight program instead). Returns their keys."""
    dropped: set[str] = set()
    for node in program.placeholders():
        role = program.roles[node.name]
        if role.kind == "derived" and not node.users:
            dropped.add(str(role.key))
            program.derived.pop(str(role.key), None)
            del program.roles[node.name]
            program.gm.graph.erase_node(node)
    return dropped


def _extended(
    old: WeightProgram,
    program: LoweredProgram,
    made: dict[tuple[str, bool], Made],
    fmt: str,
    dropped: set[str],
) -> WeightProgram:
    """The weight program with q and s of every quantized weight as outputs, the outputs
    nothing reads any more left out, and the inputs nothing needs left out."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_fqn: dict[str, fx.Node] = {}
    olds = [n for n in old.graph.nodes if n.op == "placeholder"]
    for node, fqn in zip(olds, old.inputs, strict=True):
        env[node] = by_fqn[fqn] = graph.node_copy(node)
    inputs = list(old.inputs)
    for item in made.values():
        if item.source not in old.outputs and item.source not in by_fqn:
            placeholder = graph.placeholder(f"w{len(inputs)}")
            weight = _weight_node(program, item.source)
            placeholder.meta["val"] = weight.meta["val"]
            by_fqn[item.source] = placeholder
            inputs.append(item.source)
    results: list[Any] = []
    for node in old.graph.nodes:
        if node.op == "output":
            results = list(fx.node.map_arg(node.args[0], lambda a: env[a]))
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda a: env[a])
    computed = dict(zip(old.outputs, results, strict=True))
    outputs = {k: v for k, v in computed.items() if k not in dropped}
    for item in made.values():
        value = computed[item.source] if item.source in computed else by_fqn[item.source]
        both = graph.call_function(QUANTIZE_WEIGHT, (value, fmt, item.columns))
        outputs[str(program.roles[item.q.name].key)] = graph.call_function(
            operator.getitem, (both, 0)
        )
        outputs[str(program.roles[item.s.name].key)] = graph.call_function(
            operator.getitem, (both, 1)
        )
    graph.output(tuple(outputs.values()))
    graph.eliminate_dead_code()
    kept = []
    for node, fqn in zip(_placeholders(graph), inputs, strict=True):
        if node.users:
            kept.append(fqn)
        else:
            graph.erase_node(node)
    return WeightProgram(graph, kept, list(outputs))


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _weight_node(program: LoweredProgram, fqn: str) -> fx.Node:
    return next(n for n in program.placeholders() if str(program.roles[n.name].key) == fqn)
