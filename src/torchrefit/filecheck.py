"""What a file's metadata must be before `load` builds anything from it.

The metadata is data an author controls. Each check here turns a file that would fail later
(a KeyError at the first refit, an AssertionError at the first call, an allocation far
beyond the file's size, an engine for a device this machine lacks) into a
`SerializationError` at load that names the file and the entry. Nothing here imports or
runs anything a file names: dtypes and devices are looked up in tables (`export.DTYPES`,
`export.parse_device`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from .errors import SerializationError, SettingsError
from .tables import parse_device, parse_dtype

LINEAGE_KINDS = ("identity", "cast", "state", "program")
MAX_DIM = 1 << 40  # a stored size; real ones are far smaller, Python ints are unbounded


def check_state(data: dict[str, Any], path: str) -> None:
    """Every name the state refers to exists, and every kind is known: before any tensor is
    allocated or any engine loaded."""
    specs = _names(data["specs"], "fqn", path, "weight spec")
    store = data["store"]
    lineage = data["lineage"]
    if not isinstance(store, dict) or not isinstance(lineage, dict) or set(store) != set(lineage):
        raise _bad(path, "its engine constants and their lineage name different keys")
    for key, origin in lineage.items():
        _check_lineage(key, origin, specs, path)
    dtypes = data["engine_dtypes"]
    for fqn, name in dtypes.items():
        _dtype(name, f"engine dtype of {fqn!r}", path)
    used = {s for o in lineage.values() if o["kind"] != "state" for s in o["sources"]}
    program = data["weight_program"]
    inputs, outputs = program["inputs"], program["outputs"]
    missing = sorted((used | set(inputs)) - set(dtypes))
    if missing:
        raise _bad(path, f"weights {missing[:3]} have no engine dtype")
    if set(inputs) - specs:
        raise _bad(path, f"the weight program reads {sorted(set(inputs) - specs)[:3]}, no weights")
    derived = {k for k, o in lineage.items() if o["kind"] == "program"}
    if len(outputs) != len(set(outputs)) or set(outputs) != derived:
        raise _bad(
            path,
            f"the weight program computes {sorted(outputs)[:3]}, but the derived constants are "
            f"{sorted(derived)[:3]}",
        )
    for name, target in data["aliases"].items():
        if not isinstance(name, str) or target not in specs:
            raise _bad(path, f"the tied name {name!r} names {target!r}, which is no weight")
    _subset(data.get("inf_allowed", []), store, "constants that may hold inf", path)
    _subset(list(data.get("output_constants", {}).values()), store, "output constants", path)
    _check_mutations(data.get("mutations", []), lineage, len(data["guards"]), path)
    if data.get("lm") is not None:
        _check_lm(data["lm"], store, lineage, path)


def check_devices(data: dict[str, Any], path: str) -> None:
    """Every device the file names is one torchrefit runs engines on, and this machine has it.
    A file saved on a GPU and loaded where torch has no CUDA is refused here, naming the
    device its engines need (not with torch's AssertionError when the first one is made)."""
    named = [spec["device"] for spec in data["store"].values()]
    named += [g[1] for g in data["guards"] if isinstance(g, list) and g and g[0] != "value"]
    try:
        devices = {parse_device(name) for name in named}
    except SettingsError as exc:
        raise _bad(path, str(exc)) from exc
    for device in sorted(devices, key=str):
        if device.type == "cuda":
            _check_cuda(device, path)


def _check_cuda(device: torch.device, path: str) -> None:
    weights_alone = (
        "To read its weights alone on this machine (they are stored on the host, as "
        "safetensors): safetensors.torch.load(zipfile.ZipFile(path).read('weights.safetensors'))"
        ", or refit a module compiled here from them."
    )
    if not torch.cuda.is_available():
        raise SerializationError(
            f"{path!r} holds engines for {device} (it was saved on a GPU); this torch "
            f"{torch.__version__} has no usable CUDA device, so they cannot run here. Load it "
            f"on a machine with a CUDA GPU. {weights_alone}"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SerializationError(
            f"{path!r} holds engines for {device}; this machine has {count} CUDA device(s). "
            f"Load it where {device} exists (CUDA_VISIBLE_DEVICES may renumber them). "
            f"{weights_alone}"
        )


def store_bytes(spec: dict[str, Any], path: str) -> int:
    """The bytes a stored constant's spec claims, from its dtype (looked up in the table)
    and shape (checked to be a list of sizes)."""
    return (
        math.prod(shape_of(spec, path)) * _dtype(spec["dtype"], "a constant's dtype", path).itemsize
    )


def shape_of(spec: dict[str, Any], path: str) -> list[int]:
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < MAX_DIM for d in shape):
        raise _bad(path, f"a stored shape {str(shape)[:80]} is not a list of sizes")
    return shape


def check_claim(claimed: int, limit: int, path: str, what: str) -> None:
    """The memory a file claims beyond the bytes it holds stays under `limit`, checked
    before anything is allocated."""
    if claimed > limit:
        raise SerializationError(
            f"{path!r} asks for {claimed / 1e6:.1f} MB that it does not hold ({what}), more "
            f"than the {limit / 1e6:.1f} MB allowed. If you trust the file, allow it: "
            f"torchrefit.load(path, max_bytes={claimed}), or load it with its weights "
            "(weights=...), whose size raises the bound."
        )


def check_graph(graph: fx.Graph, data: dict[str, Any], leaves: int, path: str) -> None:
    """The top graph takes one input per guard and returns the state writes, then the
    `leaves` outputs of the output structure: else the first call would fail."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(data["guards"]):
        raise _bad(path, f"the graph takes {len(placeholders)} inputs, its guards describe "
                         f"{len(data['guards'])}")  # fmt: skip
    output = next(n for n in graph.nodes if n.op == "output")
    returned = output.args[0]
    count = len(returned) if isinstance(returned, (tuple, list)) else -1
    expected = len(data.get("mutations", [])) + leaves
    if count != expected:
        raise _bad(
            path,
            f"the graph returns {count} values; its state writes and outputs need {expected}",
        )


def call_arity(graph: fx.Graph) -> dict[str, set[int]]:
    """Module name -> the numbers of arguments the graph calls it with (one pass)."""
    arity: dict[str, set[int]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            arity.setdefault(str(node.target), set()).add(len(node.args) + len(node.kwargs))
    return arity


def check_variants(counts: set[int], name: str, signatures: list[Any], path: str) -> None:
    """Each variant's signature describes as many activations as the graph passes the engine
    (`counts`, from `call_arity`), and no two variants share one."""
    for signature in signatures:
        if len(counts) != 1 or len(signature) not in counts:
            raise _bad(
                path,
                f"a variant of engine {name!r} is compiled for {len(signature)} activations; "
                f"the graph passes it {sorted(counts)}",
            )
    if len(set(signatures)) != len(signatures):
        raise _bad(path, f"engine {name!r} holds two variants for one signature")


def _check_lineage(key: Any, origin: Any, specs: set[str], path: str) -> None:
    kind, sources = origin["kind"], origin["sources"]
    if kind not in LINEAGE_KINDS or not isinstance(sources, list) or not set(sources) <= specs:
        raise _bad(path, f"engine constant {key!r} has lineage {str(origin)[:120]}")
    if kind != "program" and sources != [key]:
        raise _bad(path, f"engine constant {key!r} ({kind}) names sources {sources[:3]}")


def _check_mutations(mutations: list[Any], lineage: dict[str, Any], inputs: int, path: str) -> None:
    """A state write goes to a buffer the forward writes, or to one of the call's inputs."""
    for entry in mutations:
        kind, target = entry
        if kind == "buffer" and target in lineage and lineage[target]["kind"] == "state":
            continue
        if kind == "input" and isinstance(target, str) and target.isdigit():
            if int(target) < inputs:
                continue
        raise _bad(path, f"a state write {str(entry)[:80]} names no state buffer or input")


def _check_lm(
    lm: dict[str, Any], store: dict[str, Any], lineage: dict[str, Any], path: str
) -> None:
    """A decoder's limits agree with its KV cache buffers: what `generate` allocates from
    them is bounded by the cache the load bound counted."""
    batch, seq, vocab = lm["max_batch_size"], lm["max_seq_len"], lm["vocab_size"]
    if not all(type(v) is int for v in (batch, seq, vocab)) or batch < 1 or seq < 8 or vocab < 1:
        raise _bad(path, f"its decoder limits {batch!r}, {seq!r}, {vocab!r} are not sizes")
    keys = lm["cache_keys"]
    if not keys or not isinstance(keys, list):
        raise _bad(path, "its decoder names no KV cache")
    for key in keys:
        shape = store[key]["shape"] if key in store else None
        if lineage.get(key, {}).get("kind") != "state" or not isinstance(shape, list):
            raise _bad(path, f"its KV cache names {str(key)[:80]}, which is no state buffer")
        if len(shape) != 4 or shape[0] != max(3, batch) or shape[2] != seq:
            raise _bad(
                path,
                f"KV cache buffer {key!r} has shape {shape[:6]}; max_batch_size {batch} and "
                f"max_seq_len {seq} need ({max(3, batch)}, heads, {seq}, head dim)",
            )
    tokens = [*lm.get("eos_token_id", []), lm.get("pad_token_id")]
    if any(t is not None and (type(t) is not int or not 0 <= t < vocab) for t in tokens):
        raise _bad(path, f"its token ids {tokens[:4]} are not in the vocabulary of {vocab}")


def _names(entries: list[Any], field: str, path: str, what: str) -> set[str]:
    names = [e[field] for e in entries]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise _bad(path, f"its {what}s repeat a name or hold a name that is no string")
    return set(names)


def _subset(keys: list[Any], known: dict[str, Any], what: str, path: str) -> None:
    unknown = [k for k in keys if not isinstance(k, str) or k not in known]
    if unknown:
        raise _bad(path, f"its {what} name {str(unknown[:3])[:120]}, which it does not hold")


def _dtype(name: Any, what: str, path: str) -> torch.dtype:
    try:
        return parse_dtype(name)
    except SettingsError as exc:
        raise _bad(path, f"{what}: {exc}") from exc


def _bad(path: str, why: str) -> SerializationError:
    return SerializationError(
        f"{path!r} is malformed: {why.rstrip('.')}. The file was changed or corrupted; save "
        "the module again."
    )
