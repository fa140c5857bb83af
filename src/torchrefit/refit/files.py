"""Safetensors files as weight sources: a checked header, then bytes read on demand.

The format is a JSON header and raw bytes: nothing is executed or unpickled. A `FileTensor`
says where one tensor lies; the read stage yields them in place of tensors, the evaluate
stage reads the few a weight program needs, and the commit stage streams the rest into the
engine buffers in bounded chunks (host memory stays far below the file's size).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BufferedReader
from typing import Any

import torch

from ..errors import IncompatibleWeightsError, TorchRefitError

CHUNK_BYTES = 32 << 20

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class FileTensor:
    """Where one tensor lies in a safetensors file (absolute byte offsets)."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


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
            name: _entry(path, name, entry, start, size)
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise unreadable(path, exc) from exc


def _entry(path: str, name: str, entry: dict[str, Any], start: int, size: int) -> FileTensor:
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} has dtype {entry['dtype']!r}, which torchrefit does not read")
    begin, end = (start + int(o) for o in entry["data_offsets"])
    shape = tuple(int(d) for d in entry["shape"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not start <= begin <= end <= size or end - begin != math.prod(shape) * itemsize:
        raise ValueError(f"tensor {name!r} has offsets {entry['data_offsets']} that do not fit its shape")
    return FileTensor(path, dtype, shape, begin, end)


def unreadable(path: str, exc: BaseException) -> IncompatibleWeightsError:
    return IncompatibleWeightsError(
        f"{path!r} is not a readable safetensors file ({exc}). torchrefit reads weights "
        "from safetensors only, never from pickles; convert with safetensors.torch.save_file."
    )


def read_tensor(t: FileTensor) -> torch.Tensor:
    """One tensor, read whole into host memory."""
    out = torch.empty(t.end - t.begin, dtype=torch.uint8)
    try:
        with open(t.path, "rb") as f:
            f.seek(t.begin)
            if f.readinto(out.numpy().data) != out.numel():
                raise ValueError("the file ends early")
    except (OSError, ValueError) as exc:
        raise unreadable(t.path, exc) from exc
    return out.view(t.dtype).view(t.shape)


def buffer_bytes() -> int:
    return max(CHUNK_BYTES, 8)  # room for at least one element of any dtype


def chunks_of(
    f: BufferedReader, t: FileTensor, buffer: Callable[[], torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first element, the elements) for each chunk of `t`, read into `buffer()`:
    a chunk is valid until the next one is read."""
    item = t.itemsize
    step = max(item, CHUNK_BYTES // item * item)
    for offset in range(t.begin, t.end, step):
        size = min(step, t.end - offset)
        raw = buffer()[:size]
        f.seek(offset)
        if f.readinto(raw.numpy().data) != size:
            raise unreadable(t.path, ValueError("the file ends early"))
        yield (offset - t.begin) // item, raw.view(t.dtype)


def peak_magnitude(t: FileTensor, scratch: torch.Tensor) -> float:
    """The largest |value| of a floating tensor in the file (NaN if it holds one), read in
    chunks: a reading pass, no write."""
    peak = 0.0
    with open(t.path, "rb") as f:
        for _, chunk in chunks_of(f, t, lambda: scratch):
            if chunk.numel():
                largest = chunk.abs().max().item()  # NaN when the chunk holds one
                if largest != largest:
                    return largest
                peak = max(peak, largest)
    return peak
