"""save / load: one zip file of engine artifacts, safetensors weights and JSON metadata.

Weights and metadata are data and load without unpickling. Engine artifacts are code
(Inductor's hold generated code and pickled cache entries): each one's SHA-256 sits in the
metadata, and a mismatch refuses to load.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Collection
from typing import Any, BinaryIO

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .calls import CallSignature
from .engine import get_backend
from .errors import SerializationError
from .export import WeightSpec, dtype_name, parse_dtype
from .fileio import atomic_write
from .graph_io import check_name, graph_from_json, graph_to_json
from .lm import CompiledLM
from .lower.context import Lineage
from .module import (
    CompiledModule,
    Engine,
    Fallback,
    InputGuard,
    LMInfo,
    RefitState,
    Signature,
    Variant,
    dtype_named,
    make_fallback,
)
from .settings import BACKENDS, Settings
from .weights import WeightProgram, WeightStore

FORMAT = "torchrefit"
VERSION = 1
# member -> SHA-256: detects corruption (a hash inside the file cannot detect tampering)
CHECKSUMS = "checksums.json"


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
    scratch = set(state.lm.cache_keys) if state.lm is not None else set()  # a KV cache
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": torch.__version__,
        "graph": graph_to_json(module.graph),
        "children": children,
        "state": _state_to_json(state),
        "stripped": sorted(stripped),
        "scratch": sorted(scratch),
    }
    with state.guard.refit:  # one complete weight set, even while another thread refits
        kept = {
            k: t.detach().to("cpu", copy=True)
            for k, t in state.store.tensors.items()
            if k not in stripped and k not in scratch
        }
    weights = save_tensors(kept)

    members = {
        "metadata.json": json.dumps(metadata, indent=1).encode(),
        "weights.safetensors": weights,
    }
    members.update({f"engines/{name}.bin": data for name, data in artifacts.items()})
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
            archive.writestr(CHECKSUMS, json.dumps(sums, indent=1))

    atomic_write(path, write)  # a kill or a full disk leaves the old file whole


def stripped_keys(state: RefitState) -> set[str]:
    """Constants computed from at least one persistent weight: what a checkpoint supplies.

    Non-persistent buffers and lifted constants stay in a stripped file, since no
    checkpoint holds them."""
    persistent = {fqn for fqn, spec in state.specs.items() if spec.persistent}
    return {k for k, lineage in state.lineage.items() if persistent & set(lineage.sources)}


# What a file that is corrupt or hostile can raise while being parsed: all become
# SerializationError naming the file.
MALFORMED = (
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    RecursionError,
    RuntimeError,
    OverflowError,
    EOFError,
    NotImplementedError,
    OSError,
    zipfile.BadZipFile,
    zlib.error,
)
MAX_METADATA_BYTES = 256 << 20
DERIVED_GROWTH = 64  # a derived constant holds at most this many times its sources' elements


def load(path: str) -> CompiledModule:
    """Read a file written by `save`. A module saved without weights refuses to run until a
    refit supplies them (`torchrefit.load(path, weights=...)` does both)."""
    try:
        return _load(path)
    except SerializationError:
        raise
    except MALFORMED as exc:
        raise SerializationError(
            f"{path!r} is incomplete or malformed ({type(exc).__name__}: {str(exc)[:200]}). "
            "Save the module again."
        ) from exc


def _load(path: str) -> CompiledModule:
    archive, metadata = open_file(path)
    with archive:
        stripped = set(metadata.get("stripped", []))
        weights = (
            {} if _all_stripped(metadata, stripped) else _read_weights(archive, path, metadata)
        )
        scratch = set(metadata.get("scratch", []))
        state = _state_from_json(metadata["state"], weights, stripped, scratch)
        root = torch.nn.Module()
        for attr in state.output_constants:
            root.register_buffer(check_name(attr, "attribute"), torch.empty(0), persistent=False)
        for child in metadata["children"]:
            root.add_module(
                check_name(child["name"], "child"), _child_from_json(child, archive, state, path)
            )
        graph = graph_from_json(metadata["graph"])
    _check_references(graph, root, path)
    compiled = (CompiledLM if state.lm is not None else CompiledModule)(root, graph)
    compiled._torchrefit = state
    compiled.bind(state.store)
    return compiled


def _all_stripped(metadata: dict[str, Any], stripped: set[str]) -> bool:
    return set(metadata["state"]["store"]) <= stripped


def _check_references(graph: fx.Graph, root: torch.nn.Module, path: str) -> None:
    """Every module and attribute the top graph names exists (else it would fail when called).
    An attribute is a buffer, or a fallback passed as a torch.cond / while_loop branch."""
    children = dict(root.named_children())
    readable = set(dict(root.named_buffers())) | {
        n for n, c in children.items() if isinstance(c, Fallback)
    }
    for node in graph.nodes:
        if (node.op == "call_module" and node.target not in children) or (
            node.op == "get_attr" and node.target not in readable
        ):
            raise SerializationError(
                f"{path!r}: the graph names {node.target!r}, which the file lacks."
            )


def _member(archive: zipfile.ZipFile, name: str, path: str, limit: int | None = None) -> bytes:
    """One member's bytes, stored uncompressed (save never compresses): what is read is
    what the file holds, so a small file cannot expand into a large allocation."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > os.path.getsize(path):
        raise SerializationError(
            f"{path!r}: member {name!r} is compressed or larger than the file."
        )
    if limit is not None and info.file_size > limit:
        raise SerializationError(
            f"{path!r}: member {name!r} is {info.file_size} bytes, over {limit}."
        )
    data = archive.read(info)
    expected = _checksums(archive, path).get(name)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise SerializationError(
            f"{path!r}: {name!r} does not match its SHA-256; the file was changed or corrupted. "
            "Save the module again."
        )
    return data


def _checksums(archive: zipfile.ZipFile, path: str) -> dict[str, str]:
    """SHA-256 of each member, written by save (they detect corruption, not tampering)."""
    if CHECKSUMS not in archive.namelist():
        return {}
    info = archive.getinfo(CHECKSUMS)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > 1 << 20:
        raise SerializationError(f"{path!r}: {CHECKSUMS!r} is malformed.")
    sums = json.loads(archive.read(info))
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise SerializationError(f"{path!r}: {CHECKSUMS!r} is malformed.")
    return sums


def _read_weights(
    archive: zipfile.ZipFile, path: str, metadata: dict[str, Any]
) -> dict[str, torch.Tensor]:
    data = _member(archive, "weights.safetensors", path)
    try:
        return load_tensors(data)
    except Exception as exc:  # noqa: BLE001 - the safetensors parser's own errors
        raise SerializationError(
            f"{path!r} holds no readable weights.safetensors ({exc}). Save the module again."
        ) from exc


def _placeholder(spec: dict[str, Any]) -> torch.Tensor:
    """Room for a stripped weight, not written: the module refuses to run until a refit
    fills it, and untouched host memory costs no physical pages."""
    return torch.empty(
        _shape(spec), dtype=parse_dtype(spec["dtype"]), device=torch.device(spec["device"])
    )


def _zeros(spec: dict[str, Any]) -> torch.Tensor:
    """A KV cache as a fresh CompiledLM holds it: its contents never outlive a call."""
    return torch.zeros(
        _shape(spec), dtype=parse_dtype(spec["dtype"]), device=torch.device(spec["device"])
    )


def _shape(spec: dict[str, Any]) -> list[int]:
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
        raise SerializationError(f"A stored shape {str(shape)[:80]} is not a list of sizes.")
    return shape


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
    return tensor.to(torch.device(spec["device"]))


def _check_store_specs(
    data: dict[str, Any], specs: dict[str, WeightSpec], lineage: dict[str, Lineage]
) -> None:
    """Recorded constant shapes agree with the weights they come from, before anything is
    allocated: an edited shape cannot make a small file allocate terabytes."""
    for key, spec in data["store"].items():
        shape = _shape(spec)
        origin = lineage[key]
        sources = [specs[s] for s in origin.sources]
        if origin.kind in ("identity", "cast", "state"):
            if [list(s.shape) for s in sources] != [shape]:
                raise SerializationError(
                    f"Engine constant {key!r} is recorded as {shape}; its weight is "
                    f"{[list(s.shape) for s in sources]}. The file was changed or corrupted."
                )
        elif math.prod(shape) > DERIVED_GROWTH * sum(math.prod(s.shape) for s in sources) + (
            1 << 20
        ):
            raise SerializationError(
                f"Derived constant {key!r} is recorded as {shape}, far larger than its sources "
                f"{[s.fqn for s in sources]}. The file was changed or corrupted."
            )


def _children_to_json(module: CompiledModule) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    children, artifacts = [], {}
    for name, child in module.named_children():
        if isinstance(child, Engine):
            backend = get_backend(child.backend)
            if child.artifact is None:
                child.artifact = backend.dump(child.runner)
            artifacts[name] = child.artifact
            variants = []
            for i, (key, variant) in enumerate(child.variants.items()):
                if variant.artifact is None:
                    variant.artifact = backend.dump(variant.runner)
                artifacts[f"{name}.variant{i}"] = variant.artifact
                variants.append(
                    {
                        "signature": _signature_to_json(key),
                        "sha256": hashlib.sha256(variant.artifact).hexdigest(),
                    }
                )
            children.append(
                {
                    "name": name,
                    "kind": "engine",
                    "backend": child.backend,
                    "constant_keys": child.constant_keys,
                    "single_output": child.single_output,
                    "sha256": hashlib.sha256(child.artifact).hexdigest(),
                    "variants": variants,
                }
            )
        elif isinstance(child, Fallback):
            children.append(
                {
                    "name": name,
                    "kind": "fallback",
                    "constant_keys": child.constant_keys,
                    "graph": graph_to_json(child.graph),
                }
            )
    return children, artifacts


def _child_from_json(
    data: dict[str, Any], archive: zipfile.ZipFile, state: RefitState, path: str
) -> torch.nn.Module:
    keys = list(data["constant_keys"])
    unknown = [k for k in keys if not isinstance(k, str) or k not in state.store.tensors]
    if unknown:
        raise SerializationError(
            f"{path!r}: child {data['name']!r} names constants {unknown[:3]} the file lacks."
        )
    if data["kind"] == "fallback":
        graph = graph_from_json(data["graph"])
        allowed = {f"_w{i}" for i in range(len(keys))}
        if any(
            n.op in ("get_attr", "call_module") and n.target not in allowed for n in graph.nodes
        ):
            raise SerializationError(
                f"{path!r}: fallback {data['name']!r} reads attributes it does not hold."
            )
        return make_fallback(graph, keys)
    if data["kind"] != "engine" or data["backend"] not in BACKENDS:
        raise SerializationError(f"{path!r}: child {data['name']!r} is of unknown kind or backend.")
    backend = get_backend(data["backend"], dict(state.settings.inductor_options))
    name = data["name"]
    # every signature and checksum checked before any artifact is loaded
    signatures = [_signature_from_json(v["signature"], path) for v in data.get("variants", [])]
    artifact = _artifact(archive, name, data["sha256"], path)
    codes = [
        _artifact(archive, f"{name}.variant{i}", v["sha256"], path)
        for i, v in enumerate(data.get("variants", []))
    ]
    runner = backend.load(artifact)
    variants = {
        key: Variant(backend.load(code), code) for key, code in zip(signatures, codes, strict=True)
    }
    return Engine(data["backend"], runner, keys, bool(data["single_output"]), artifact, variants)


def _artifact(archive: zipfile.ZipFile, name: str, sha256: Any, path: str) -> bytes:
    """An engine's (or variant's) code, checked against the SHA-256 its metadata records."""
    artifact = _member(archive, f"engines/{name}.bin", path)
    digest = hashlib.sha256(artifact).hexdigest()
    if digest != sha256:
        raise SerializationError(
            f"Engine {name!r} in {path!r} has SHA-256 {digest}, but the metadata records "
            f"{sha256}. The file was changed or corrupted; engine artifacts are code, "
            "so torchrefit refuses to load it. Save the module again from its source."
        )
    return artifact


def _signature_to_json(key: Signature) -> list[Any]:
    return [
        ["value", k[1]] if k[0] == "value" else [str(k[0]).removeprefix("torch."), *k[1:]]
        for k in key
    ]


def _signature_from_json(data: Any, path: str) -> Signature:
    """A variant's activation signature: (dtype, shape, strides) per tensor, or a value."""
    key: list[Any] = []
    for entry in data:
        if entry[0] == "value":
            if not isinstance(entry[1], (int, float, bool, str, type(None))):
                raise SerializationError(f"{path!r}: a variant signature holds {entry[1]!r}.")
            key.append(("value", entry[1]))
            continue
        dtype = dtype_named(entry[0])
        shape, strides = entry[1], entry[2]
        ints = all(isinstance(n, int) and not isinstance(n, bool) for n in [*shape, *strides])
        if not ints or len(shape) != len(strides):
            raise SerializationError(f"{path!r}: a variant signature entry {entry!r} is malformed.")
        key.append((dtype, tuple(shape), tuple(strides)))
    return tuple(key)


def open_file(path: str) -> tuple[zipfile.ZipFile, dict[str, Any]]:
    """The archive and its checked metadata (JSON: nothing runs)."""
    try:
        archive = zipfile.ZipFile(path)
    except MALFORMED as exc:
        raise SerializationError(f"{path!r} is not a torchrefit file ({exc}).") from exc
    try:
        return archive, _read_metadata(archive, path)
    except BaseException as exc:
        archive.close()
        if isinstance(exc, MALFORMED):
            raise SerializationError(f"{path!r} has no readable metadata.json ({exc}).") from exc
        raise


def _read_metadata(archive: zipfile.ZipFile, path: str) -> dict[str, Any]:
    metadata = json.loads(_member(archive, "metadata.json", path, MAX_METADATA_BYTES))
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
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
        "cast_inputs_to": None
        if state.cast_inputs_to is None
        else dtype_name(state.cast_inputs_to),
        "output_constants": state.output_constants,
        "inf_allowed": sorted(state.inf_allowed),
        "mutations": [list(m) for m in state.mutations],
        "signature": None if state.signature is None else state.signature.to_json(),
        "lm": None if state.lm is None else state.lm.to_json(),
    }


def _state_from_json(
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
    _check_store_specs(data, specs, lineage)
    store = WeightStore(
        {
            k: _placeholder(spec)
            if k in stripped
            else _zeros(spec)
            if k in scratch
            else _checked_tensor(k, spec, tensors)
            for k, spec in data["store"].items()
        }
    )
    cast = data["cast_inputs_to"]
    return RefitState(
        settings=Settings.from_json(data["settings"]),
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
