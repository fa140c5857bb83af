"""Lowering: decompositions, then torchrefit's passes, in order, each a function in its own file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from torch.export import ExportedProgram

from .check_lineage import check_lineage
from .context import Lineage, LoweredProgram, LoweringContext, Role
from .decompose import decompose
from .fold_batch_norm import fold_batch_norm
from .hoist_weights import hoist_weights
from .quantize import quantize
from .write_state import write_state

logger = logging.getLogger("torchrefit")

Pass = Callable[[LoweredProgram, LoweringContext], LoweredProgram]

PIPELINE: tuple[Pass, ...] = (
    fold_batch_norm,
    hoist_weights,
    quantize,
    write_state,
    check_lineage,
)


def lower(ep: ExportedProgram, ctx: LoweringContext) -> LoweredProgram:
    """ExportedProgram -> a lowered graph of core ATen ops with a weight program beside it."""
    program = decompose(ep)
    checking = os.environ.get("TORCHREFIT_CHECK") == "1"
    for run_pass in PIPELINE:
        program = run_pass(program, ctx)
        if checking:
            program.gm.graph.lint()
            check_lineage(program, ctx)
        logger.debug("lowering pass %s done", run_pass.__name__)
    return program


__all__ = ["PIPELINE", "Lineage", "LoweredProgram", "LoweringContext", "Role", "lower"]
