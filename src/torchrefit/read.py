"""Read new weights from what users hold: {source FQN: tensor}, never unpickling."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram

from .errors import IncompatibleWeightsError, TorchRefitError
from .export import WeightSpec, source_tensors


@dataclass
class NewWeights:
    tensors: dict[str, torch.Tensor]
    origin: str  # "exported_program", "module", "state_dict" or "safetensors"
    program: ExportedProgram | None = None
    module: torch.nn.Module | None = None

    @property
    def complete(self) -> bool:
        """Whether non-persistent buffers and constants are expected to be present."""
        return self.origin in ("exported_program", "module")


def read_weights(new: Any, specs: dict[str, WeightSpec]) -> NewWeights:
    if isinstance(new, ExportedProgram):
        return NewWeights(source_tensors(new), "exported_program", program=new)
    if isinstance(new, torch.nn.Module):
        return NewWeights(_module_tensors(new, specs), "module", module=new)
    if isinstance(new, (str, os.PathLike)):
        return NewWeights(_read_safetensors(os.fspath(new)), "safetensors")
    if isinstance(new, Mapping):
        bad = [k for k, v in new.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise IncompatibleWeightsError(
                f"The state_dict maps {bad[:3]} to non-tensors; expected FQN -> torch.Tensor."
            )
        return NewWeights(dict(new), "state_dict")
    raise TorchRefitError(
        f"refit_module_weights got new weights of type {type(new).__name__}; expected an "
        "ExportedProgram, an nn.Module, a state_dict (FQN -> tensor) or a safetensors path."
    )


def _module_tensors(module: torch.nn.Module, specs: dict[str, WeightSpec]) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for fqn, spec in specs.items():
        if spec.kind == "constant" and fqn not in tensors:
            value = _get_path(module, fqn)
            if isinstance(value, torch.Tensor):
                tensors[fqn] = value
    return {k: v.detach() for k, v in tensors.items()}


def _get_path(module: torch.nn.Module, fqn: str) -> Any:
    value: Any = module
    for part in fqn.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise TorchRefitError(f"Weights file {path!r} does not exist.")
    try:
        return load_file(path)
    except Exception as exc:
        raise IncompatibleWeightsError(
            f"{path!r} is not a readable safetensors file ({exc}). torchrefit reads weights "
            "from safetensors only, never from pickles; convert with safetensors.torch.save_file."
        ) from exc
