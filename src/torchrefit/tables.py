"""The one table of names a file may hold for a dtype, a layout, a memory format or a device.

A name read from a file (or from another rank) is looked up here, never with `getattr` on
torch: that would import a submodule for some names (`torch.onnx`, `torch._inductor`) and
give back whatever the name names. Devices are the kinds engines run on.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .errors import SettingsError


def _named(kind: type) -> dict[str, Any]:
    """Every value of `kind` torch defines, by its own name ("bfloat16"; aliases such as
    "half" are not names a file holds)."""
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


DTYPES: dict[str, torch.dtype] = _named(torch.dtype)
LAYOUTS: dict[str, torch.layout] = _named(torch.layout)
MEMORY_FORMATS: dict[str, torch.memory_format] = _named(torch.memory_format)

DEVICE_TYPES = ("cpu", "cuda")
_DEVICE = re.compile(r"(cpu|cuda)(?::(0|[1-9][0-9]?|1[01][0-9]|12[0-7]))?")  # torch: 0 to 127


def parse_dtype(name: Any) -> torch.dtype:
    """The dtype `name` names ("float16"); SettingsError (a ValueError) for anything else."""
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise SettingsError(f"{str(name)[:80]!r} names no torch dtype.")
    return dtype


def parse_device(name: Any) -> torch.device:
    """The device `name` names ("cpu", "cuda", "cuda:1"); SettingsError (a ValueError) for
    anything else, such as "meta", "xpu" or "hpu", where torchrefit runs no engine."""
    found = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if found is None:
        raise SettingsError(
            f"{str(name)[:80]!r} names no device torchrefit runs engines on; expected one of "
            f"{DEVICE_TYPES}, e.g. 'cpu' or 'cuda:0'."
        )
    kind, index = found.groups()
    return torch.device(kind) if index is None else torch.device(kind, int(index))
