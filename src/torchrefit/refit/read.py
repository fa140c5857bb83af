"""The read stage: new weights from what users hold, as {source FQN: tensor}, never unpickling.

Every kind of source yields the same `NewWeights`. A safetensors file, a sharded checkpoint's
index file or a directory holding either yields `FileTensor`s (shape, dtype and where the
bytes lie, in one file or several) in place of tensors: later stages read or stream them.
A trainer's DTensors (FSDP2) are read as their local tensors where those hold the whole
weight. A peft model given to an engine of its base model yields its adapted layers' merged
weights (`lora.LoraMerge`): a partial refit of those constants.
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
from ..lora import LoraMerge, merge_of
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
    partial: bool = False  # only these weights are refitted; the others keep their values

    @property
    def complete(self) -> bool:
        """Whether non-persistent buffers and constants are expected to be present."""
        return self.origin in ("exported_program", "module")


def read(
    new: Any,
    specs: dict[str, WeightSpec],
    name_map: NameMap | None = None,
    *,
    strict: bool = True,
    device: torch.device | None = None,
) -> NewWeights:
    """`new` as NewWeights, its names mapped by `name_map` (a dict, or a function whose None
    drops a name). `strict=False`: a partial refit (the weights not given keep their
    values). A peft model whose adapted layers are plain weights of the compiled model
    gives those layers merged, computed on `device` (the engines')."""
    merge = peft_merge(new, specs, name_map, device or torch.device("cpu"))
    if merge is not None:
        return merged(merge, new)
    weights = _read(new, specs)
    weights = weights if name_map is None else rename(weights, name_map)
    weights.partial = not strict
    for name, t in weights.untyped.items():
        raise WeightDtypeError(
            f"Weight {name!r} in {t.path!r} has the safetensors dtype {t.dtype}, which torch has "
            "no dtype for. Drop it (a name_map function returning None for it), or convert it."
        )
    return weights


def peft_merge(
    new: Any, specs: dict[str, WeightSpec], name_map: NameMap | None, device: torch.device
) -> LoraMerge | None:
    """The merge plan when `new` is a peft model of the compiled (base) model."""
    if not isinstance(new, torch.nn.Module):
        return None
    return merge_of(new, lambda fqn: _dtype(specs.get(fqn)), name_map, device)


def _dtype(spec: WeightSpec | None) -> torch.dtype | None:
    return None if spec is None else _DTYPES.get(spec.dtype)


_DTYPES = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def merged(merge: LoraMerge, model: torch.nn.Module) -> NewWeights:
    """A peft model's adapted layers, merged now: a partial refit of those constants (the
    engine's other weights are the peft model's frozen base). `model` runs eagerly for
    `verify_output`."""
    merge()
    return NewWeights(dict(merge.outputs), "state_dict", module=model, partial=True)


def _read(new: Any, specs: dict[str, WeightSpec]) -> NewWeights:
    if isinstance(new, ExportedProgram):
        return NewWeights(dict(source_tensors(new)), "exported_program", program=new)
    if isinstance(new, torch.nn.Module):
        tensors = module_tensors(new, specs)
        return NewWeights({k: whole(k, v) for k, v in tensors.items()}, "module", module=new)
    if isinstance(new, (str, os.PathLike)):
        header = checkpoint(os.fspath(new))
        return NewWeights(dict(header.tensors), "safetensors", untyped=header.untyped)
    if isinstance(new, Mapping):
        bad = [k for k, v in new.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise IncompatibleWeightsError(
                f"The state_dict maps {bad[:3]} to non-tensors; expected FQN -> torch.Tensor."
            )
        return NewWeights({k: whole(k, v) for k, v in new.items()}, "state_dict")
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


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def whole(name: str, tensor: Any) -> torch.Tensor:
    """`tensor`, or a DTensor's local tensor where it holds the whole weight (one rank, or
    replicated): a view of the trainer's own memory. A weight sharded over ranks is refused:
    a refit takes whole weights."""
    if type(tensor) in _PLAIN or not hasattr(tensor, "device_mesh"):
        return tensor
    local = tensor.to_local()
    if local.shape != tensor.shape:
        raise TorchRefitError(
            f"Weight {name!r} is a DTensor sharded over {tensor.device_mesh.size()} ranks "
            f"(this rank holds {list(local.shape)} of {list(tensor.shape)}); a refit takes "
            "whole weights. Gather them first (torch.distributed.checkpoint.state_dict."
            "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))), "
            "or refit from a rank that holds whole weights."
        )
    return local


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
