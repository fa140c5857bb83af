"""Fold inference batch norm into the convolution before it.

The folded weight and bias are weight-only nodes over the source FQNs (conv weight and
bias, batch norm weight, bias, running mean and variance); hoisting turns them into a
weight program, so a refit recomputes them exactly.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from .context import LoweredProgram, LoweringContext, add_node

logger = logging.getLogger("torchrefit")
aten = torch.ops.aten


def fold_batch_norm(program: LoweredProgram, ctx: LoweringContext) -> LoweredProgram:
    if not ctx.settings.fold_batch_norm:
        return program
    folded = 0
    for bn in list(program.gm.graph.nodes):
        if _foldable(program, bn):
            _fold(program, bn)
            folded += 1
    if folded:
        program.gm.graph.eliminate_dead_code()
        program.gm.recompile()
        logger.debug("folded %d batch norms into convolutions", folded)
    return program


def _is_weight(program: LoweredProgram, arg: object) -> bool:
    if arg is None:
        return True
    role = program.role(arg) if isinstance(arg, fx.Node) else None
    return role is not None and role.kind == "weight"


def _foldable(program: LoweredProgram, bn: fx.Node) -> bool:
    if bn.op != "call_function" or bn.target != aten._native_batch_norm_legit_no_training.default:
        return False
    conv = bn.args[0]
    if not isinstance(conv, fx.Node) or conv.target != aten.convolution.default:
        return False
    if len(conv.users) != 1 or conv.args[6]:  # shared output, or transposed
        return False
    if not all(_is_weight(program, a) for a in (conv.args[1], conv.args[2], *bn.args[1:5])):
        return False
    users = list(bn.users)
    return all(u.target is operator.getitem and u.args[1] == 0 for u in users)


def _fold(program: LoweredProgram, bn: fx.Node) -> None:
    graph = program.gm.graph
    conv = bn.args[0]
    assert isinstance(conv, fx.Node)  # _foldable checked it
    conv_args: tuple[Any, ...] = tuple(conv.args)
    bn_args: tuple[Any, ...] = tuple(bn.args)
    x, weight, bias, *conv_rest = conv_args
    gamma, beta, mean, var, _momentum, eps = bn_args[1:7]
    dtype = weight.meta["val"].dtype
    with graph.inserting_before(conv):
        up = lambda n: n if n is None else _as_float32(graph, n)  # noqa: E731
        inv_std = add_node(
            graph, aten.rsqrt.default, (add_node(graph, aten.add.Scalar, (up(var), eps)),)
        )
        scale = inv_std if gamma is None else add_node(graph, aten.mul.Tensor, (inv_std, up(gamma)))
        shape = [-1] + [1] * (weight.meta["val"].dim() - 1)
        new_weight = add_node(
            graph, aten.mul.Tensor, (up(weight), add_node(graph, aten.view.default, (scale, shape)))
        )
        shifted = add_node(graph, aten.neg.default, (up(mean),))
        if bias is not None:
            shifted = add_node(graph, aten.add.Tensor, (up(bias), shifted))
        new_bias = add_node(graph, aten.mul.Tensor, (shifted, scale))
        if beta is not None:
            new_bias = add_node(graph, aten.add.Tensor, (new_bias, up(beta)))
        new_weight, new_bias = (_cast(graph, n, dtype) for n in (new_weight, new_bias))
        folded = add_node(graph, aten.convolution.default, (x, new_weight, new_bias, *conv_rest))
    bn_fqn = _fqn(program, mean).rsplit(".", 1)[0]
    for node, source in ((new_weight, weight), (new_bias, bias)):
        program.notes[node] = (
            f"batch norm {bn_fqn!r} folded into convolution "
            f"{_fqn(program, weight).rsplit('.', 1)[0]!r}"
        )
        program.names[node] = (
            f"~bn_folded:{_fqn(program, source) if source is not None else bn_fqn + '.bias'}"
        )
    for user in list(bn.users):
        user.replace_all_uses_with(folded)
        graph.erase_node(user)
    graph.erase_node(bn)
    graph.erase_node(conv)


def _fqn(program: LoweredProgram, node: fx.Node) -> str:
    return str(program.roles[node.name].key)


def _as_float32(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Fold in float32 at least, so a float16 engine folds as exactly as it can."""
    if node.meta["val"].dtype in (torch.float32, torch.float64):
        return node
    return add_node(graph, aten._to_copy.default, (node,), {"dtype": torch.float32})


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    if node.meta["val"].dtype == dtype:
        return node
    return add_node(graph, aten._to_copy.default, (node,), {"dtype": dtype})
