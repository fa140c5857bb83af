"""The definition of quantized weights (issue 18), which kernels and tests compare against.

For a weight `w` oriented (out, in):

    s = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0   (127.0: int8)
    q = (w.float() / s).to(torch.float8_e4m3fn)
        int8: torch.round(w.float() / s).clamp(-127, 127).to(torch.int8)

and a layer computes with `(q.float() * s).to(dtype)`. A weight stored (in, out) and used
transposed (GPT-2's Conv1D) is quantized per column of what is stored: `q` is then held
(out, in), the layout the matrix kernels read.
"""

from __future__ import annotations

import torch

FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "fp8": (torch.float8_e4m3fn, 448.0),
    "int8": (torch.int8, 127.0),
}
QUANTIZED_DTYPES = frozenset(dtype for dtype, _ in FORMATS.values())
SCALE_SUFFIX = "_scale"  # a checkpoint's scale of `X.weight` is `X.weight_scale`


def format_of(dtype: torch.dtype) -> str | None:
    """ "fp8" or "int8" for a quantized weight's dtype, else None."""
    return next((name for name, (d, _) in FORMATS.items() if d == dtype), None)


def reference(
    w: torch.Tensor, fmt: str, columns: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, op by op: (q, s) of `w` (of `w.t()` if `columns`), q contiguous."""
    dtype, top = FORMATS[fmt]
    x = w.float()
    if columns:
        x = x.t()
    s = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
    if fmt == "int8":
        q = torch.round(x / s).clamp(-127, 127).to(dtype)
    else:
        q = (x / s).to(dtype)
    return q.contiguous(), s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight a layer computes with, oriented (out, in)."""
    return (q.float() * s.reshape(-1, 1).float()).to(dtype)
