"""The verify stage: run the refitted module and eager PyTorch with the new weights on the
same inputs, compare every output tensor with a tolerance chosen by dtype, and raise."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import RefitVerificationError, TorchRefitError
from ..module import CompiledModule
from .commit import rewrite
from .evaluate import evaluate, validate
from .match import Matched, computed_weights, slow
from .read import NewWeights

logger = logging.getLogger("torchrefit")

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
            return (
                f"output {name} has shape {getattr(a, 'shape', None)}, eager gives {tuple(e.shape)}"
            )
        if not (a.is_floating_point() or e.is_floating_point()):
            if not torch.equal(a.cpu(), e.cpu()):
                return f"output {name} ({a.dtype}) differs from eager"
            continue
        err, tol = relative_error(a, e), tolerance(a.dtype, e.dtype)
        if err > tol and (worst is None or err / tol > worst[0]):
            worst = (
                err / tol,
                f"output {name} differs from eager by relative error {err:.3g} "
                f"(tolerance {tol:.0e} for {a.dtype})",
            )
    return None if worst is None else worst[1]


def check_verifiable(new: NewWeights, arg_inputs: Any) -> None:
    """Refuse, before any write, a verification that could not run."""
    if arg_inputs is None:
        raise TorchRefitError("verify_output=True needs arg_inputs to run both models on.")
    if new.program is None and new.module is None:
        raise TorchRefitError(
            "verify_output=True needs new weights that can run eagerly: an nn.Module or an "
            "ExportedProgram, not a state_dict or a file."
        )


def verify(
    target: CompiledModule, new: NewWeights, matched: Matched, arg_inputs: Any, kwarg_inputs: Any
) -> None:
    """Compare with eager; retry the slow path once after a fast-path mismatch; raise."""
    reference = _reference(new, arg_inputs, kwarg_inputs, computed_weights(target._torchrefit))
    error = compare_outputs(target(*arg_inputs, **(kwarg_inputs or {})), reference)
    if error is not None and matched.path == "fast" and new.program is not None:
        logger.warning(
            "verification failed after the fast path (%s); retrying the slow path", error
        )
        state = target._torchrefit
        values = evaluate(slow(new, state, arg_inputs, kwarg_inputs), state)
        validate(values, state)
        rewrite(target, values)
        error = compare_outputs(target(*arg_inputs, **(kwarg_inputs or {})), reference)
    if error is not None:
        raise RefitVerificationError(
            f"After the refit, {error}. The module was left as it was before the refit. The "
            "new weights' model computes something else than the compiled one (another "
            "forward, or random ops); if it is the compiled model and deterministic, please "
            "report it with the model."
        )


def _reference(
    new: NewWeights, args: tuple[Any, ...], kwargs: Any, quantized: dict[str, torch.Tensor]
) -> Any:
    """Eager outputs of the new weights; a quantized engine's linear weights as it computes
    with them (dequantized), the rest (a tied embedding's lookup too) as given. A trainer in
    training mode runs in eval mode for it (the engines were compiled in eval semantics:
    dropout off), then goes back."""
    module = new.program.module() if new.program is not None else new.module
    assert module is not None  # check_verifiable ran first
    # an exported program's module has its mode traced in (and refuses eval())
    training = {m: m.training for m in module.modules()} if new.program is None else {}
    if training:
        module.eval()
    try:
        with torch.no_grad():
            if not quantized:
                return module(*args, **(kwargs or {}))
            params = dict(module.named_parameters(remove_duplicate=False))
            used = {
                k: v.to(device=params[k].device, dtype=params[k].dtype)
                for k, v in quantized.items()
                if k in params
            }
            return torch.func.functional_call(
                module, used, args, kwargs or {}, tie_weights=False, strict=False
            )
    finally:
        for m, mode in training.items():
            m.training = mode
