"""Safetensors files as weight sources: a checked header, then bytes read on demand.

The format is a JSON header and raw bytes: nothing is executed or unpickled. A `FileTensor`
says where one tensor lies; the read stage yields them in place of tensors, the evaluate
stage reads the few a weight program needs, and the commit stage streams the rest into the
engine buffers in bounded chunks (host memory stays far below the file's size).

A header is accepted only if the safetensors library accepts it too (it parses the header,
never unpickles, and checks what the format requires: integer offsets covering the data
region exactly, in order, without gaps or overlaps; known dtypes; non-negative dims); our
own parse of the same bytes gives the offsets we stream from.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BufferedReader
from typing import Any, NamedTuple, cast

import torch
from safetensors import SafetensorError, safe_open

from ..errors import IncompatibleWeightsError, TorchRefitError
from ..fileio import open_regular

CHUNK_BYTES = 32 << 20
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers

# Every dtype the safetensors format defines: its torch dtype (None where torch has none)
# and its size in bits.
_FORMAT_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "U16": (torch.uint16, 16),
    "I16": (torch.int16, 16),
    "U32": (torch.uint32, 32),
    "I32": (torch.int32, 32),
    "U64": (torch.uint64, 64),
    "I64": (torch.int64, 64),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "F32": (torch.float32, 32),
    "F64": (torch.float64, 64),
    "C64": (torch.complex64, 64),
    "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 8),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 8),
    "F8_E8M0": (torch.float8_e8m0fnu, 8),
    "F4": (torch.float4_e2m1fn_x2, 4),  # torch packs two values in one element
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
}
_UPCAST_BLOCK = 1 << 20  # elements upcast at once where torch has no abs/max for a dtype


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
        return self.dtype.itemsize


class UntypedTensor(NamedTuple):
    """A tensor of a dtype the format defines but torch has none for: usable only if dropped."""

    path: str
    dtype: str  # the safetensors dtype, e.g. "F6_E2M3"


@dataclass(frozen=True)
class Header:
    """What one safetensors file (or a sharded checkpoint) holds, by tensor name."""

    tensors: dict[str, FileTensor]
    untyped: dict[str, UntypedTensor]


def index_safetensors(path: str) -> dict[str, FileTensor]:
    """Name -> FileTensor from the file's JSON header, every entry checked against the file.
    Tensors of a dtype torch lacks (F6_*) are left out: `read_header` lists them."""
    return read_header(path).tensors


def read_header(path: str) -> Header:
    """The file's tensors, refused unless both our checks and the safetensors library's pass."""
    if not os.path.exists(path):
        raise TorchRefitError(f"Weights file {path!r} does not exist.")
    try:
        size, start, header = _raw_header(path)
        entries = {
            name: _entry(path, name, e, start, size)
            for name, e in header.items()
            if name != "__metadata__"
        }
    except RecursionError as exc:
        raise unreadable(path, ValueError("its header nests JSON too deep to parse")) from exc
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise unreadable(path, exc) from exc
    _library_check(path, set(entries))
    return Header(
        {k: v for k, v in entries.items() if isinstance(v, FileTensor)},
        {k: v for k, v in entries.items() if isinstance(v, UntypedTensor)},
    )


def _raw_header(path: str) -> tuple[int, int, dict[str, Any]]:
    """(file size, where the data begins, the header as JSON), its length bounded before it
    is read: a regular file only (a FIFO or /dev/zero is refused, never read), and JSON
    nested too deep for the parser is refused (RecursionError)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError("it is shorter than the 8 bytes that give its header's length")
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > MAX_HEADER_BYTES:
            raise ValueError(
                f"its header claims {header_size} bytes, more than the {MAX_HEADER_BYTES} "
                "safetensors allows"
            )
        if header_size > size - 8:
            raise ValueError(f"its header claims {header_size} bytes, more than the file holds")
        header = json.loads(f.read(header_size).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return size, 8 + header_size, header


def _entry(path: str, name: str, entry: Any, start: int, size: int) -> FileTensor | UntypedTensor:
    if not isinstance(entry, dict):
        raise ValueError(
            f"tensor {name!r} is described by {type(entry).__name__}, not a JSON object"
        )
    code = entry["dtype"]
    if not isinstance(code, str) or code not in _FORMAT_DTYPES:
        raise ValueError(
            f"tensor {name!r} has dtype {code!r}, which the safetensors format does not define"
        )
    dtype, bits = _FORMAT_DTYPES[code]
    begin, end = (start + o for o in _ints(name, "data_offsets", entry["data_offsets"]))
    shape = _ints(name, "shape", entry["shape"])
    if not start <= begin <= end <= size or (end - begin) * 8 != math.prod(shape) * bits:
        raise ValueError(
            f"tensor {name!r} has offsets {entry['data_offsets']} that do not fit its shape "
            "and the file"
        )
    if code == "F4" and shape and shape[-1] % 2 == 0:
        return FileTensor(path, torch.float4_e2m1fn_x2, (*shape[:-1], shape[-1] // 2), begin, end)
    if dtype is None or code == "F4":  # F4 with an odd last dim has no torch shape
        return UntypedTensor(path, code)
    return FileTensor(path, dtype, shape, begin, end)


def _ints(name: str, key: str, values: Any) -> tuple[int, ...]:
    """Non-negative JSON integers (not floats, strings or booleans)."""
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"tensor {name!r} has {key} {values!r}; expected non-negative integers")
    if key == "data_offsets" and len(values) != 2:
        raise ValueError(f"tensor {name!r} has data_offsets {values!r}; expected [begin, end]")
    return tuple(values)


def _library_check(path: str, names: set[str]) -> None:
    """The safetensors library's own validation of the header, which we must agree with."""
    try:
        with safe_open(path, framework="pt") as f:
            known = set(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        text = str(exc)[:300]
        raise unreadable(path, ValueError(f"the safetensors library refuses it: {text}")) from exc
    if known != names:
        raise unreadable(
            path, ValueError("the safetensors library reads other tensor names from it")
        )


def unreadable(path: str, exc: BaseException) -> IncompatibleWeightsError:
    return IncompatibleWeightsError(
        f"{path!r} is not a readable safetensors file ({str(exc)[:300]}). torchrefit reads weights "
        "from safetensors only, never from pickles; convert with safetensors.torch.save_file."
    )


def open_weights(path: str) -> BufferedReader:
    """A weights file opened again to read its bytes: a regular file still (a path swapped
    for a FIFO since its header was read would block forever), else a typed error."""
    try:
        return cast(BufferedReader, open_regular(path))  # os.fdopen(fd, "rb") is one
    except (OSError, ValueError) as exc:
        raise unreadable(path, exc) from exc


def read_tensor(t: FileTensor) -> torch.Tensor:
    """One tensor, read whole into host memory."""
    out = torch.empty(t.end - t.begin, dtype=torch.uint8)
    try:
        with open_weights(t.path) as f:
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
    """(index of the first element, the elements) for each chunk of `t`, read into `buffer()`
    from `f` (opened "rb"): a chunk is valid until the next one is read."""
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
    with open_weights(t.path) as f:
        for _, chunk in chunks_of(f, t, lambda: scratch):
            largest = _largest(chunk)
            if largest != largest:  # NaN
                return largest
            peak = max(peak, largest)
    return peak


def _largest(chunk: torch.Tensor) -> float:
    """max |x| of a chunk; float8 dtypes have no abs or max in torch, so they are upcast a
    block at a time."""
    if chunk.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return chunk.abs().max().item() if chunk.numel() else 0.0
    largest = 0.0
    for first in range(0, chunk.numel(), _UPCAST_BLOCK):
        value = chunk[first : first + _UPCAST_BLOCK].float().abs().max().item()
        if value != value:
            return value
        largest = max(largest, value)
    return largest
