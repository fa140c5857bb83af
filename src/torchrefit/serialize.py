"""save / load: one zip file of engine artifacts, safetensors weights and JSON metadata.

Weights and metadata are data and load without unpickling. Engine artifacts are code
(Inductor's hold generated code and pickled cache entries): each one's SHA-256 sits in the
metadata, and a mismatch refuses to load.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
import zipfile
from typing import Any, BinaryIO

import torch
import torch.utils._pytree as pytree
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .engine import get_backend
from .errors import SerializationError
from .export import WeightSpec, dtype_name, parse_dtype
from .fileio import atomic_write
from .graph_io import graph_from_json, graph_to_json
from .lower.context import Lineage
from .module import CompiledModule, Engine, Fallback, InputGuard, RefitState, make_fallback
from .settings import Settings
from .weights import WeightProgram, WeightStore

FORMAT = "torchrefit"
VERSION = 1


def save(module: CompiledModule, path: str, include_weights: bool = True) -> None:
    """Write `module` to one file. `include_weights=False` leaves out every constant that
    comes from a checkpoint weight (a small file: ship engines once, weights separately);
    `load(path, weights=...)` then refits from a state_dict or safetensors file."""
    state = module._torchrefit
    stripped = stripped_keys(state) if include_weights is False else set()
    if state.unset and not stripped >= state.unset:
        raise SerializationError(
            f"This module's weights were never supplied ({sorted(state.unset)[:3]}...); save "
            "it with include_weights=False, or refit it first."
        )
    children, artifacts = _children_to_json(module)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": torch.__version__,
        "graph": graph_to_json(module.graph),
        "children": children,
        "state": _state_to_json(state),
        "stripped": sorted(stripped),
    }
    with state.guard.refit:  # one complete weight set, even while another thread refits
        kept = {k: t.detach().to("cpu", copy=True) for k, t in state.store.tensors.items() if k not in stripped}
    weights = save_tensors(kept)

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("metadata.json", json.dumps(metadata, indent=1))
            archive.writestr("weights.safetensors", weights)
            for name, data in artifacts.items():
                archive.writestr(f"engines/{name}.bin", data)

    atomic_write(path, write)  # a kill or a full disk leaves the old file whole


def stripped_keys(state: RefitState) -> set[str]:
    """Constants computed from at least one persistent weight: what a checkpoint supplies.

    Non-persistent buffers and lifted constants stay in a stripped file, since no
    checkpoint holds them."""
    persistent = {fqn for fqn, spec in state.specs.items() if spec.persistent}
    return {k for k, lineage in state.lineage.items() if persistent & set(lineage.sources)}


def load(path: str) -> CompiledModule:
    """Read a file written by `save`. A module saved without weights refuses to run until a
    refit supplies them (`torchrefit.load(path, weights=...)` does both)."""
    archive, metadata = open_file(path)
    with archive:
        try:
            stripped = set(metadata.get("stripped", []))
            state = _state_from_json(metadata["state"], _read_weights(archive, path), stripped)
            root = torch.nn.Module()
            for attr in state.output_constants:
                root.register_buffer(attr, torch.empty(0), persistent=False)
            for child in metadata["children"]:
                root.add_module(child["name"], _child_from_json(child, archive, state.settings, path))
            graph = graph_from_json(metadata["graph"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(
                f"{path!r} is incomplete or malformed ({type(exc).__name__}: {exc}). Save the "
                "module again."
            ) from exc
    compiled = CompiledModule(root, graph)
    compiled._torchrefit = state
    compiled.bind(state.store)
    return compiled


def _read_weights(archive: zipfile.ZipFile, path: str) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(archive.read("weights.safetensors"))
    except Exception as exc:
        raise SerializationError(
            f"{path!r} holds no readable weights.safetensors ({exc}). Save the module again."
        ) from exc


def _placeholder(spec: dict[str, Any]) -> torch.Tensor:
    """Room for a stripped weight; NaN, so that nothing could ever compute with it unnoticed."""
    dtype = parse_dtype(spec["dtype"])
    empty = torch.empty(spec["shape"], dtype=dtype, device=spec["device"])
    return empty.fill_(float("nan")) if empty.is_floating_point() else empty.zero_()


def _checked_tensor(key: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
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


def _children_to_json(module: CompiledModule) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    children, artifacts = [], {}
    for name, child in module.named_children():
        if isinstance(child, Engine):
            if child.artifact is None:
                child.artifact = get_backend(child.backend).dump(child.runner)
            artifacts[name] = child.artifact
            children.append({
                "name": name,
                "kind": "engine",
                "backend": child.backend,
                "constant_keys": child.constant_keys,
                "single_output": child.single_output,
                "sha256": hashlib.sha256(child.artifact).hexdigest(),
            })
        elif isinstance(child, Fallback):
            children.append({
                "name": name,
                "kind": "fallback",
                "constant_keys": child.constant_keys,
                "graph": graph_to_json(child.graph),
            })
    return children, artifacts


def _child_from_json(data: dict[str, Any], archive: zipfile.ZipFile, settings: Settings, path: str):
    if data["kind"] == "fallback":
        return make_fallback(graph_from_json(data["graph"]), list(data["constant_keys"]))
    artifact = archive.read(f"engines/{data['name']}.bin")
    digest = hashlib.sha256(artifact).hexdigest()
    if digest != data["sha256"]:
        raise SerializationError(
            f"Engine {data['name']!r} in {path!r} has SHA-256 {digest}, but the metadata records "
            f"{data['sha256']}. The file was changed or corrupted; engine artifacts are code, "
            "so torchrefit refuses to load it. Save the module again from its source."
        )
    runner = get_backend(data["backend"], dict(settings.inductor_options)).load(artifact)
    return Engine(data["backend"], runner, list(data["constant_keys"]), data["single_output"], artifact)


def open_file(path: str) -> tuple[zipfile.ZipFile, dict[str, Any]]:
    """The archive and its checked metadata (JSON: nothing runs)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SerializationError(f"{path!r} is not a torchrefit file ({exc}).") from exc
    try:
        return archive, _read_metadata(archive, path)
    except SerializationError:
        archive.close()
        raise


def _read_metadata(archive: zipfile.ZipFile, path: str) -> dict[str, Any]:
    try:
        metadata = json.loads(archive.read("metadata.json"))
    except (KeyError, ValueError) as exc:
        raise SerializationError(f"{path!r} has no readable metadata.json ({exc}).") from exc
    if metadata.get("format") != FORMAT:
        raise SerializationError(f"{path!r} is not a torchrefit file.")
    if metadata.get("version") != VERSION:
        raise SerializationError(
            f"{path!r} is format version {metadata.get('version')}; this torchrefit reads "
            f"version {VERSION}. Save it again with this version."
        )
    return metadata


def _state_to_json(state: RefitState) -> dict[str, Any]:
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
        "cast_inputs_to": None if state.cast_inputs_to is None else dtype_name(state.cast_inputs_to),
        "output_constants": state.output_constants,
        "inf_allowed": sorted(state.inf_allowed),
        "mutations": [list(m) for m in state.mutations],
    }


def _state_from_json(data: dict[str, Any], tensors: dict[str, torch.Tensor], stripped: set[str]) -> RefitState:
    store = WeightStore({
        k: _placeholder(spec) if k in stripped else _checked_tensor(k, spec, tensors).to(spec["device"])
        for k, spec in data["store"].items()
    })
    cast = data["cast_inputs_to"]
    return RefitState(
        settings=Settings.from_json(data["settings"]),
        fingerprint=data["fingerprint"],
        structure=list(data["structure"]),
        lowered_structure=data["lowered_structure"],
        specs={s["fqn"]: WeightSpec.from_json(s) for s in data["specs"]},
        aliases=dict(data["aliases"]),
        engine_dtypes={k: parse_dtype(v) for k, v in data["engine_dtypes"].items()},
        weight_program=WeightProgram.from_json(data["weight_program"]),
        lineage={k: Lineage.from_json(v) for k, v in data["lineage"].items()},
        store=store,
        in_spec=_treespec(data["in_spec"]),
        out_spec=_treespec(data["out_spec"]),
        guards=[InputGuard.from_json(g) for g in data["guards"]],
        lowered_order=list(data["lowered_order"]),
        cast_inputs_to=None if cast is None else parse_dtype(cast),
        unset=set(stripped),
        output_constants=dict(data.get("output_constants", {})),
        inf_allowed=set(data.get("inf_allowed", [])),
        mutations=[(str(k), str(t)) for k, t in data.get("mutations", [])],
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
