"""A compiled module's refit state as versioned JSON, and its store rebuilt from a file.

Writing is `state_to_json`. Reading (`state_from_json`) trusts nothing it reads: every shape
is checked against the weight it comes from before anything is allocated, a stripped
weight's room is allocated but never written, and the settings read describe the engines
only (they never name a directory).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import sys
from collections.abc import Collection
from typing import Any

import torch
import torch.utils._pytree as pytree

from .calls import CallSignature
from .errors import SerializationError
from .export import WeightSpec, dtype_name
from .filecheck import shape_of
from .lower.context import Lineage
from .module import InputGuard, LMInfo, RefitState
from .settings import Settings
from .tables import parse_device, parse_dtype
from .weights import WeightProgram, WeightStore

DERIVED_GROWTH = 64  # a derived constant holds at most this many times its sources' elements


def _room(spec: dict[str, Any]) -> torch.Tensor:
    """A stand-in of a constant's dtype, device and shape that holds no memory (every element
    one scalar): the store allocates the constant's room, and nothing writes it."""
    scalar = torch.empty((), dtype=parse_dtype(spec["dtype"]), device=parse_device(spec["device"]))
    return scalar.expand(spec["shape"])


def _new_store(
    data: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    stripped: set[str],
    scratch: Collection[str],
) -> WeightStore:
    """The store, filled with the file's weights; a KV cache is zeros, as a fresh CompiledLM
    holds it; a stripped weight's room is never written (untouched host memory costs no
    physical pages), and the module refuses to run until a refit fills it."""
    specs = data["store"]
    held = {
        k: _checked_tensor(k, spec, tensors)
        for k, spec in specs.items()
        if k not in stripped and k not in scratch
    }
    store = WeightStore({k: _room(spec) for k, spec in specs.items()}, copy_values=False)
    with torch.no_grad():
        for key, value in held.items():
            store[key].copy_(value)
        for key in scratch:
            store[key].zero_()
    return store


def _checked_tensor(
    key: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> torch.Tensor:
    tensor = tensors.get(key)
    if tensor is None:
        raise SerializationError(f"weights.safetensors lacks engine constant {key!r}.")
    if list(tensor.shape) != spec["shape"] or dtype_name(tensor.dtype) != spec["dtype"]:
        raise SerializationError(
            f"Engine constant {key!r} is stored as {tensor.dtype}{list(tensor.shape)}; the "
            f"metadata records {spec['dtype']}{spec['shape']}. The file was changed or "
            "corrupted; save the module again."
        )
    return tensor


def check_store_specs(data: dict[str, Any], path: str) -> None:
    """Recorded constant shapes agree with the weights they come from, before anything is
    allocated: an edited shape cannot make a small file allocate terabytes."""
    specs = {s["fqn"]: s for s in data["specs"]}
    for key, spec in data["store"].items():
        shape = shape_of(spec, path)
        origin = data["lineage"][key]
        sources = [shape_of(specs[s], path) for s in origin["sources"]]
        if origin["kind"] != "program":
            if sources != [shape]:
                raise SerializationError(
                    f"Engine constant {key!r} is recorded as {shape}; its weight is "
                    f"{sources}. The file was changed or corrupted."
                )
        elif math.prod(shape) > DERIVED_GROWTH * sum(math.prod(s) for s in sources) + (1 << 20):
            raise SerializationError(
                f"Derived constant {key!r} is recorded as {shape}, far larger than its sources "
                f"{origin['sources'][:3]}. The file was changed or corrupted."
            )


def state_to_json(state: RefitState) -> dict[str, Any]:
    return {
        "settings": state.settings.to_json(),
        "fingerprint": state.fingerprint,
        "structure": state.structure,
        "lowered_structure": state.lowered_structure,
        "specs": [s.to_json() for s in state.specs.values()],
        "aliases": state.aliases,
        "engine_dtypes": {k: dtype_name(v) for k, v in state.engine_dtypes.items()},
        "weight_program": state.weight_program.to_json(),
        "lineage": {k: v.to_json() for k, v in state.lineage.items()},
        "store": {
            k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "device": str(t.device)}
            for k, t in state.store.tensors.items()
        },
        "in_spec": pytree.treespec_dumps(state.in_spec),
        "out_spec": pytree.treespec_dumps(state.out_spec),
        "guards": [g.to_json() for g in state.guards],
        "lowered_order": state.lowered_order,
        "cast_inputs_to": None
        if state.cast_inputs_to is None
        else dtype_name(state.cast_inputs_to),
        "output_constants": state.output_constants,
        "inf_allowed": sorted(state.inf_allowed),
        "mutations": [list(m) for m in state.mutations],
        "signature": None if state.signature is None else state.signature.to_json(),
        "lm": None if state.lm is None else state.lm.to_json(),
    }


def state_from_json(
    data: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    stripped: set[str],
    scratch: Collection[str] = (),
) -> RefitState:
    specs = {s["fqn"]: WeightSpec.from_json(s) for s in data["specs"]}
    lineage = {k: Lineage.from_json(v) for k, v in data["lineage"].items()}
    cache = set((data.get("lm") or {}).get("cache_keys", []))
    for key in scratch:
        if key not in cache or key not in lineage or lineage[key].kind != "state":
            raise SerializationError(
                f"The file leaves out {key!r} as a KV cache, but it is not one of the model's "
                "cache buffers. The file was changed or corrupted; save the module again."
            )
    store = _new_store(data, tensors, stripped, scratch)
    cast = data["cast_inputs_to"]
    return RefitState(
        settings=described(Settings.from_json(data["settings"])),
        fingerprint=data["fingerprint"],
        structure=list(data["structure"]),
        lowered_structure=data["lowered_structure"],
        specs=specs,
        aliases=dict(data["aliases"]),
        engine_dtypes={k: parse_dtype(v) for k, v in data["engine_dtypes"].items()},
        weight_program=WeightProgram.from_json(data["weight_program"]),
        lineage=lineage,
        store=store,
        in_spec=_treespec(data["in_spec"]),
        out_spec=_treespec(data["out_spec"]),
        guards=[InputGuard.from_json(g) for g in data["guards"]],
        lowered_order=list(data["lowered_order"]),
        cast_inputs_to=None if cast is None else parse_dtype(cast),
        unset=set(stripped) & set(store.tensors),
        output_constants=dict(data.get("output_constants", {})),
        inf_allowed=set(data.get("inf_allowed", [])),
        mutations=[(str(k), str(t)) for k, t in data.get("mutations", [])],
        signature=None
        if data.get("signature") is None
        else CallSignature.from_json(data["signature"]),
        lm=None if data.get("lm") is None else LMInfo.from_json(data["lm"]),
    )


def described(settings: Settings) -> Settings:
    """Settings read from a file describe its engines; they never name a directory nor turn
    a safety off: the engine cache's fields, the finiteness check and the staging bound are
    the defaults (a loaded module's cache and checks are the caller's)."""
    defaults = Settings()
    return dataclasses.replace(
        settings,
        cache_dir=defaults.cache_dir,
        cache_max_bytes=defaults.cache_max_bytes,
        check_finite=defaults.check_finite,
        staging_bytes=defaults.staging_bytes,
    )


# Output types (e.g. transformers' ModelOutput classes) are registered with pytree when
# their module is imported. Only modules of these packages are imported on load.
OUTPUT_TYPE_PACKAGES = ("transformers", "diffusers")


def _import_output_types(text: str) -> None:
    found = re.findall(r'"type": "([A-Za-z_][A-Za-z0-9_.]*)"', text)
    for name in found:
        module = name.rpartition(".")[0]
        if module.split(".")[0] in OUTPUT_TYPE_PACKAGES and module not in sys.modules:
            importlib.import_module(module)


def _treespec(text: str) -> pytree.TreeSpec:
    try:
        _import_output_types(text)
        return pytree.treespec_loads(text)
    except Exception as exc:
        raise SerializationError(
            f"The saved output structure names a type that is not registered ({exc}). Import "
            "the library that defines the model's outputs (e.g. transformers) before "
            "torchrefit.load."
        ) from exc
