"""The two ops quantized engines and their weight programs call (the definition is in
`definition.py`).

`torchrefit::quantize_weight` is the weight program's op (w -> q, s): on CUDA one Triton
pass per tensor reads each row once and writes q and s, bit-identical to the definition
computed on that device; elsewhere the definition itself. `torchrefit::quant_mm` is the
engines' op for products of more than one row on CUDA (a Triton kernel reading the 1-byte
weights, scaling each output column after the dot: the definition up to bf16 rounding);
a decode step's products of one row are rewritten into plain aten ops before compiling
(engine/inductor.py), which Inductor fuses into one reduction reading the 1-byte weights.
"""

from __future__ import annotations

import torch

from . import kernels
from .definition import FORMATS, dequantize, reference


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantized format {fmt!r}; expected one of {sorted(FORMATS)}")


@torch.library.custom_op("torchrefit::quantize_weight", mutates_args=())
def quantize_weight(w: torch.Tensor, fmt: str, columns: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) of a weight, per the definition; one Triton pass on CUDA where it works."""
    _check_format(fmt)
    if not columns and kernels.quantize_kernel_works(w):
        return kernels.quantize_rows(w, fmt)
    return reference(w, fmt, columns)


@quantize_weight.register_fake
def _quantize_weight_fake(
    w: torch.Tensor, fmt: str, columns: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_format(fmt)
    rows, cols = (w.shape[1], w.shape[0]) if columns else (w.shape[0], w.shape[1])
    q = w.new_empty((rows, cols), dtype=FORMATS[fmt][0])
    return q, w.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("torchrefit::quant_mm", mutates_args=())
def quant_mm(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ dequantize(q, s).t() (+ bias), in x's dtype: x (M, K), q (N, K), s (N, 1)."""
    if kernels.mm_kernel_works(x, q):
        return kernels.quant_mm(x, q, s, bias)
    return reference_mm(x, q, s, bias)


@quant_mm.register_fake
def _quant_mm_fake(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))


def reference_mm(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What `quant_mm` computes, op by op (the CPU form an engine holds)."""
    w = dequantize(q, s, x.dtype)
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())


QUANTIZE_WEIGHT = torch.ops.torchrefit.quantize_weight.default
QUANT_MM = torch.ops.torchrefit.quant_mm.default
OPS = frozenset(
    {"quantize_weight", "quant_mm"}
)  # what stored graphs may call, torch.ops.torchrefit
