"""The read stage: new weights from what users hold, as {source FQN: tensor}, never unpickling.

Every kind of source yields the same `NewWeights`. A safetensors file, a sharded checkpoint's
index file or a directory holding either yields `FileTensor`s (shape, dtype and where the
bytes lie, in one file or several) in place of tensors: later stages read or stream them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch.export import ExportedProgram

from ..errors import IncompatibleWeightsError, TorchRefitError, WeightDtypeError
from ..export import WeightSpec, source_tensors
from .files import FileTensor, Header, UntypedTensor, read_header
from .shards import in_directory, read_index

Source = Union[torch.Tensor, FileTensor]  # noqa: UP007 - a runtime alias, read by isinstance users
NameMap = Union[Mapping[str, str], Callable[[str], "str | None"]]  # noqa: UP007


@dataclass
class NewWeights:
    tensors: dict[str, Source]
    origin: str  # "exported_program", "module", "state_dict" or "safetensors"
    program: ExportedProgram | None = None
    module: torch.nn.Module | None = None
    untyped: dict[str, UntypedTensor] = field(
        default_factory=dict
    )  # file tensors torch cannot hold

    @property
    def complete(self) -> bool:
        """Whether non-persistent buffers and constants are expected to be present."""
        return self.origin in ("exported_program", "module")


def read(new: Any, specs: dict[str, WeightSpec], name_map: NameMap | None = None) -> NewWeights:
    """`new` as NewWeights, its names mapped by `name_map` (a dict, or a function whose None
    drops a name)."""
    weights = _read(new, specs)
    weights = weights if name_map is None else rename(weights, name_map)
    for name, t in weights.untyped.items():
        raise WeightDtypeError(
            f"Weight {name!r} in {t.path!r} has the safetensors dtype {t.dtype}, which torch has "
            "no dtype for. Drop it (a name_map function returning None for it), or convert it."
        )
    return weights


def _read(new: Any, specs: dict[str, WeightSpec]) -> NewWeights:
    if isinstance(new, ExportedProgram):
        return NewWeights(dict(source_tensors(new)), "exported_program", program=new)
    if isinstance(new, torch.nn.Module):
        return NewWeights(dict(module_tensors(new, specs)), "module", module=new)
    if isinstance(new, (str, os.PathLike)):
        header = checkpoint(os.fspath(new))
        return NewWeights(dict(header.tensors), "safetensors", untyped=header.untyped)
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


def checkpoint(path: str) -> Header:
    """A safetensors file, a sharded checkpoint's index file (`*.index.json`), or a directory
    holding one of them. Each is read only if it is a regular file (a FIFO, socket or device
    is refused before any read, never waited on)."""
    if os.path.isdir(path):
        path = in_directory(path)
    if path.endswith(".index.json"):
        return read_index(path)
    return read_header(path)


def module_tensors(
    module: torch.nn.Module, specs: dict[str, WeightSpec]
) -> dict[str, torch.Tensor]:
    """Parameters, buffers, and the tensor attributes that the program lifted as constants."""
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
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


def rename(new: NewWeights, name_map: NameMap) -> NewWeights:
    mapped: dict[str, Source] = {}
    untyped: dict[str, UntypedTensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in [*new.tensors.items(), *new.untyped.items()]:
        target = name_map.get(name, name) if isinstance(name_map, Mapping) else name_map(name)
        if target is None:
            continue
        if target in origin:
            raise IncompatibleWeightsError(
                f"name_map maps both {origin[target]!r} and {name!r} to {target!r}; map each "
                "weight to its own name."
            )
        if isinstance(tensor, UntypedTensor):
            untyped[target] = tensor
        else:
            mapped[target] = tensor
        origin[target] = name
    origin_kind = new.origin if new.origin != "module" else "state_dict"
    return NewWeights(mapped, origin_kind, new.program, untyped=untyped)
