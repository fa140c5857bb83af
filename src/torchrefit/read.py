"""Read new weights from what users hold: {source FQN: tensor}, never unpickling."""

from __future__ import annotations

import json
import math
import os
import struct
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
        return NewWeights(read_safetensors(os.fspath(new)), "safetensors")
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class FileTensor:
    """Where one tensor lies in a safetensors file (absolute byte offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def index_safetensors(path: str) -> dict[str, FileTensor]:
    """Name -> FileTensor from the file's JSON header, every entry checked against the file."""
    if not os.path.exists(path):
        raise TorchRefitError(f"Weights file {path!r} does not exist.")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:
                raise ValueError(f"its header claims {header_size} bytes, more than the file holds")
            header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        start = 8 + header_size
        return {
            name: _entry(name, entry, start, size) for name, entry in header.items() if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise _unreadable(path, exc) from exc


def _entry(name: str, entry: dict[str, Any], start: int, size: int) -> FileTensor:
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} has dtype {entry['dtype']!r}, which torchrefit does not read")
    begin, end = (start + int(o) for o in entry["data_offsets"])
    shape = tuple(int(d) for d in entry["shape"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not start <= begin <= end <= size or end - begin != math.prod(shape) * itemsize:
        raise ValueError(f"tensor {name!r} has offsets {entry['data_offsets']} that do not fit its shape")
    return FileTensor(dtype, shape, begin, end)


def _unreadable(path: str, exc: BaseException) -> IncompatibleWeightsError:
    return IncompatibleWeightsError(
        f"{path!r} is not a readable safetensors file ({exc}). torchrefit reads weights "
        "from safetensors only, never from pickles; convert with safetensors.torch.save_file."
    )


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, read whole into one host buffer (refits stream files
    instead: see stream.py). The format is a JSON header and raw bytes: nothing is executed
    or unpickled."""
    index = index_safetensors(path)
    start = min((t.begin for t in index.values()), default=0)
    data_size = os.path.getsize(path) - start
    buffer = torch.empty(data_size, dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(buffer.numpy())) != data_size:
                raise ValueError("the file ends early")
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    return {name: _view(t, buffer, start) for name, t in index.items()}


def _view(t: FileTensor, buffer: torch.Tensor, start: int) -> torch.Tensor:
    raw = buffer[t.begin - start : t.end - start]
    itemsize = torch.empty((), dtype=t.dtype).element_size()
    if raw.numel() and (t.begin - start) % itemsize:
        raw = raw.clone()  # misaligned for its dtype: copy (rare; writers align)
    return raw.view(t.dtype).view(t.shape)


