"""Compare every output tensor of two runs, with tolerances chosen by dtype."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

# Relative error ||actual - expected|| / ||expected||, by the lower precision of the two.
TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}


def tolerance(a: torch.dtype, b: torch.dtype) -> float:
    return max(TOLERANCE.get(a, 0.0), TOLERANCE.get(b, 0.0))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("inf")
    a, e = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(e, nan=0.0)
    return (a - e).norm().item() / max(e.norm().item(), 1e-12)


def compare_outputs(actual: Any, expected: Any) -> str | None:
    """None when every tensor matches; else a sentence naming the worst output."""
    got, _ = pytree.tree_flatten_with_path(actual)
    want, _ = pytree.tree_flatten_with_path(expected)
    if len(got) != len(want):
        return f"the module returns {len(got)} values where eager returns {len(want)}"
    worst: tuple[float, str] | None = None
    for (path, a), (_, e) in zip(got, want, strict=True):
        if not isinstance(e, torch.Tensor):
            continue
        name = pytree.keystr(path) or "output"
        if not isinstance(a, torch.Tensor) or a.shape != e.shape:
            return f"output {name} has shape {getattr(a, 'shape', None)}, eager gives {tuple(e.shape)}"
        if not (a.is_floating_point() or e.is_floating_point()):
            if not torch.equal(a.cpu(), e.cpu()):
                return f"output {name} ({a.dtype}) differs from eager"
            continue
        err, tol = relative_error(a, e), tolerance(a.dtype, e.dtype)
        if err > tol and (worst is None or err / tol > worst[0]):
            worst = (err / tol, f"output {name} differs from eager by relative error {err:.3g} (tolerance {tol:.0e} for {a.dtype})")
    return None if worst is None else worst[1]
