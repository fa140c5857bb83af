"""save / load: one zip file of engine artifacts, safetensors weights and JSON metadata.

Weights and metadata are data and load without unpickling. Engine artifacts are code
(Inductor's hold generated code and pickled cache entries): each one's SHA-256 sits in the
metadata, and a mismatch refuses to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
import torch.fx as fx
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.export import ExportedProgram

from .archive import CHECKSUMS, Archive
from .engine import get_backend
from .errors import SerializationError
from .export import source_tensors
from .filecheck import (
    call_arity,
    check_claim,
    check_devices,
    check_graph,
    check_state,
    check_variants,
    store_bytes,
)
from .fileio import atomic_write
from .graph_io import check_name, graph_from_json, graph_to_json
from .lm import CompiledLM
from .module import (
    CompiledModule,
    Engine,
    Fallback,
    RefitState,
    Signature,
    Variant,
    make_fallback,
)
from .refit.read import checkpoint
from .settings import BACKENDS
from .state_json import check_store_specs, state_from_json, state_to_json
from .tables import DTYPES

FORMAT = "torchrefit"
VERSION = 1
# What a file may claim beyond the bytes it holds (placeholders of stripped weights, a KV
# cache) unless the caller sets the bound: the file's own size, plus this, plus WIDENING
# times the bytes of the weights it is loaded with (an engine dtype up to 4 times wider).
DEFAULT_CLAIM_BYTES = 1 << 30
WIDENING = 4


def save(module: CompiledModule, path: str, include_weights: bool = True) -> None:
    """Write `module` to one file. `include_weights=False` leaves out every constant that
    comes from a checkpoint weight (a small file: ship engines once, weights separately);
    `load(path, weights=...)` then refits from a state_dict or safetensors file."""
    write(module, path, include_weights)


def write(
    module: CompiledModule,
    path: str,
    include_weights: bool = True,
    *,
    comment: bytes = b"",
    check: Any = None,
) -> None:
    """`save`, with the zip archive's `comment` (the engine cache marks its entries so) and a
    `check(tmp)` that may read the written file before it replaces `path` (refit --verify)."""
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
        "state": state_to_json(state),
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

    def fill(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
            archive.writestr(CHECKSUMS, json.dumps(sums, indent=1))
            archive.comment = comment

    atomic_write(path, fill, check)  # a kill or a full disk leaves the old file whole


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


def load(path: str, *, max_bytes: int | None = None, weights_bytes: int = 0) -> CompiledModule:
    """Read a file written by `save`. A module saved without weights refuses to run until a
    refit supplies them (`torchrefit.load(path, weights=...)` does both).

    `max_bytes` bounds the memory the file may claim beyond the bytes it holds (placeholders
    of stripped weights, a decoder's KV cache), checked before anything is allocated;
    default: the file's size, plus 1 GiB, plus 4 times `weights_bytes` (the size of the
    weights it will be refitted with)."""
    try:
        return _load(path, max_bytes, weights_bytes)
    except SerializationError:
        raise
    except MALFORMED as exc:
        raise SerializationError(
            f"{path!r} is incomplete or malformed ({type(exc).__name__}: {str(exc)[:200]}). "
            "Save the module again."
        ) from exc


def _load(path: str, max_bytes: int | None, weights_bytes: int) -> CompiledModule:
    archive, metadata = open_file(path)
    with archive:
        data = metadata["state"]
        stripped, scratch = _names(metadata, "stripped"), _names(metadata, "scratch")
        check_state(data, path)
        check_devices(data, path)
        check_store_specs(data, path)
        limit = max_bytes
        if limit is None:
            limit = archive.size + DEFAULT_CLAIM_BYTES + WIDENING * weights_bytes
        claimed = sum(store_bytes(data["store"][k], path) for k in (stripped | scratch))
        check_claim(claimed, limit, path, "placeholders of stripped weights and state")
        weights = {} if set(data["store"]) <= stripped else _read_weights(archive, path)
        state = state_from_json(data, weights, stripped, scratch)
        graph = graph_from_json(metadata["graph"])
        check_graph(graph, data, state.out_spec.num_leaves, path)
        root = torch.nn.Module()
        for attr in state.output_constants:
            root.register_buffer(check_name(attr, "attribute"), torch.empty(0), persistent=False)
        _check_children(metadata["children"], archive, path)
        arity = call_arity(graph)
        for child in metadata["children"]:
            module = _child_from_json(child, archive, state, arity, path)
            root.add_module(check_name(child["name"], "child"), module)
    _check_references(graph, root, path)
    compiled = (CompiledLM if state.lm is not None else CompiledModule)(root, graph)
    compiled._torchrefit = state
    compiled.bind(state.store)
    return compiled


def weights_bytes(weights: Any) -> int:
    """The bytes a weights source holds (anything `refit_module_weights` takes): what a
    stripped file loaded with it may claim. A path's checkpoint header is read (and checked)
    for its tensors' sizes."""
    if isinstance(weights, (str, os.PathLike)):
        header = checkpoint(os.fspath(weights))
        return sum(t.end - t.begin for t in header.tensors.values())
    if isinstance(weights, ExportedProgram):
        tensors: Any = source_tensors(weights).values()
    elif isinstance(weights, torch.nn.Module):
        tensors = [*weights.parameters(), *weights.buffers()]
    elif isinstance(weights, Mapping):
        tensors = weights.values()
    else:
        return 0
    unique = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _names(metadata: dict[str, Any], key: str) -> set[str]:
    names = metadata.get(key, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SerializationError(f"The file's {key!r} list is malformed.")
    return set(names)


def _check_children(children: list[Any], archive: Archive, path: str) -> None:
    """Each child once, and every member of the file is one that the metadata uses: nothing
    is read twice, nothing unchecked rides along."""
    names = [c["name"] for c in children]
    if len(set(names)) != len(names):
        raise SerializationError(f"{path!r}: its children repeat a name; the file was changed.")
    used = {"metadata.json", "weights.safetensors"}
    for child in children:
        if child["kind"] == "engine":
            used.add(f"engines/{child['name']}.bin")
            used |= {
                f"engines/{child['name']}.variant{i}.bin"
                for i in range(len(child.get("variants", [])))
            }
    extra = sorted(archive.names() - used)
    if extra:
        raise SerializationError(
            f"{path!r} holds members {extra[:3]} that its metadata does not use; the file was "
            "changed or corrupted."
        )


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


def _read_weights(archive: Archive, path: str) -> dict[str, torch.Tensor]:
    data = archive.read("weights.safetensors")
    try:
        return load_tensors(data)
    except Exception as exc:  # noqa: BLE001 - the safetensors parser's own errors
        raise SerializationError(
            f"{path!r} holds no readable weights.safetensors ({str(exc)[:200]}). Save the "
            "module again."
        ) from exc


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
    data: dict[str, Any],
    archive: Archive,
    state: RefitState,
    arity: dict[str, set[int]],
    path: str,
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
    # a file's settings describe its engines; loading an artifact compiles nothing, so the
    # file's inductor_options are never handed to a backend
    backend = get_backend(data["backend"])
    name = data["name"]
    # every signature and checksum checked before any artifact is loaded
    signatures = [_signature_from_json(v["signature"], path) for v in data.get("variants", [])]
    check_variants(arity.get(name, set()), name, signatures, path)
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


def _artifact(archive: Archive, name: str, sha256: Any, path: str) -> bytes:
    """An engine's (or variant's) code, checked against the SHA-256 its metadata records
    (the member's hash, computed once as it was read)."""
    member = f"engines/{name}.bin"
    artifact = archive.read(member)
    digest = archive.digests[member]
    if digest != sha256:
        raise SerializationError(
            f"Engine {name!r} in {path!r} has SHA-256 {digest}, but the metadata records "
            f"{str(sha256)[:80]}. The file was changed or corrupted; engine artifacts are code, "
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
    if not isinstance(data, list):
        raise SerializationError(f"{path!r}: a variant signature is not a list.")
    key: list[Any] = []
    for entry in data:
        if not isinstance(entry, list) or not entry:
            raise SerializationError(f"{path!r}: a variant signature entry is malformed.")
        if entry[0] == "value":
            if len(entry) != 2 or not isinstance(entry[1], (int, float, bool, str, type(None))):
                raise SerializationError(f"{path!r}: a variant signature holds {entry[1:2]!r}.")
            key.append(("value", entry[1]))
            continue
        if not isinstance(entry[0], str) or entry[0] not in DTYPES:
            raise SerializationError(
                f"{path!r}: a variant signature's {str(entry[0])[:40]!r} names no torch dtype; "
                "the file is damaged or not torchrefit's: compile and save it again."
            )
        dtype = DTYPES[entry[0]]
        shape, strides = entry[1], entry[2]
        ints = all(type(n) is int and 0 <= n < 1 << 40 for n in [*shape, *strides])
        if len(entry) != 3 or not ints or len(shape) != len(strides):
            raise SerializationError(
                f"{path!r}: a variant signature entry {str(entry)[:120]} is malformed."
            )
        key.append((dtype, tuple(shape), tuple(strides)))
    return tuple(key)


def open_file(path: str) -> tuple[Archive, dict[str, Any]]:
    """The archive (its members listed and checked, none read yet) and its checked metadata
    (JSON: nothing runs)."""
    try:
        archive = Archive(path)
    except SerializationError:
        raise
    except MALFORMED as exc:
        raise SerializationError(f"{path!r} is not a torchrefit file ({str(exc)[:200]}).") from exc
    try:
        return archive, _read_metadata(archive, path)
    except BaseException as exc:
        archive.close()
        if isinstance(exc, MALFORMED) and not isinstance(exc, SerializationError):
            raise SerializationError(
                f"{path!r} has no readable metadata.json ({str(exc)[:200]})."
            ) from exc
        raise


def _read_metadata(archive: Archive, path: str) -> dict[str, Any]:
    metadata = json.loads(archive.read("metadata.json", MAX_METADATA_BYTES))
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise SerializationError(f"{path!r} is not a torchrefit file.")
    if metadata.get("version") != VERSION:
        raise SerializationError(
            f"{path!r} is format version {str(metadata.get('version'))[:20]}; this torchrefit "
            f"reads version {VERSION}. Save it again with this version."
        )
    return metadata
