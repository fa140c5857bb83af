"""The wire layout of a WeightSync and the checks made once, at construction.

A layout is, per dtype, the slots of one flat buffer (names, shapes, offsets), planned from
the reference replica's weight specs. Ranks describe what they hold as JSON-able data;
every rank checks itself against the reference (the lowest-ranked replica) and the source
against the replicas' weights, so a mismatch is named on every rank before anything moves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TorchRefitError, WeightDtypeError, WeightShapeError, WeightSyncError
from ..export import WeightSpec, dtype_name, parse_dtype
from ..refit.read import module_tensors
from ..weights import ALIGN_BYTES

logger = logging.getLogger("torchrefit")


@dataclass(frozen=True)
class Slot:
    """Where one weight lies in its dtype's flat buffer (offsets in elements)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Layout:
    """The wire format: per dtype name, the slots of one flat buffer and its length."""

    slots: dict[str, list[Slot]]
    sizes: dict[str, int]

    def digest(self) -> str:
        data = {
            d: [[s.name, list(s.shape), s.offset] for s in slots] for d, slots in self.slots.items()
        }
        return hashlib.sha256(json.dumps([data, self.sizes], sort_keys=True).encode()).hexdigest()

    def nbytes(self) -> int:
        return sum(n * parse_dtype(d).itemsize for d, n in self.sizes.items())


def plan(specs: list[WeightSpec], names: list[str]) -> Layout:
    """Slots for the weights named (in spec order), aligned as the weight store aligns them."""
    wanted = set(names)
    slots: dict[str, list[Slot]] = {}
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.fqn not in wanted:
            continue
        step = max(1, ALIGN_BYTES // parse_dtype(spec.dtype).itemsize)
        numel = _numel(spec.shape)
        start = sizes.get(spec.dtype, 0)
        slots.setdefault(spec.dtype, []).append(Slot(spec.fqn, spec.shape, start, numel))
        sizes[spec.dtype] = start + -(-numel // step) * step
    return Layout(slots, sizes)


def views(buffers: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Each weight's view of its dtype's buffer."""
    return {
        s.name: buffers[d][s.offset : s.offset + s.numel].view(s.shape)
        for d, slots in layout.slots.items()
        for s in slots
    }


def source_tensors(weights: Any, specs: dict[str, WeightSpec]) -> dict[str, torch.Tensor]:
    """The source's tensors by name: a module's parameters, buffers and lifted constants."""
    if isinstance(weights, torch.nn.Module):
        return module_tensors(weights, specs)
    return plain_tensors(weights)


def spec_map(reference: dict[str, Any]) -> dict[str, WeightSpec]:
    return {s["fqn"]: WeightSpec.from_json(s) for s in reference["specs"]}


def plain_tensors(weights: Any) -> dict[str, torch.Tensor]:
    if isinstance(weights, torch.nn.Module):
        return module_tensors(weights, {})
    if isinstance(weights, Mapping):
        return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    raise TorchRefitError(
        f"WeightSync got weights of type {type(weights).__name__}; expected an nn.Module or a "
        "state_dict (FQN -> tensor)."
    )


def full_tensors(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in order, a DTensor gathered to its full value (a collective over its
    mesh: every rank of the mesh runs this same loop); a tied DTensor is gathered once."""
    counts: dict[int, int] = {}
    for tensor in tensors.values():
        if is_dtensor(tensor):
            counts[_local_ptr(tensor)] = counts.get(_local_ptr(tensor), 0) + 1
    kept: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not is_dtensor(tensor):
            yield name, tensor
            continue
        ptr = _local_ptr(tensor)
        full = kept.get(ptr)
        if full is None:
            full = _full(tensor)
            if counts[ptr] > 1:
                kept[ptr] = full
        yield name, full


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor; never imports torch.distributed.tensor (half a second),
    since a DTensor exists only once that module has been imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _full(tensor: Any) -> torch.Tensor:
    return tensor.full_tensor()


def _local_ptr(tensor: Any) -> int:
    return int(tensor.to_local().data_ptr())


def originals(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own tensor objects (not detached copies) under the names given."""
    for name in tensors:
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        value = getattr(owner, attr, None)
        if isinstance(value, torch.Tensor):
            yield name, value


def check_source(rank: int, weights: Any, reference: dict[str, Any]) -> str:
    """The source against the replicas' weights: every needed name, shape and dtype."""
    try:
        tensors = source_tensors(weights, spec_map(reference))
    except TorchRefitError as e:
        return usage(rank, str(e))
    aliases = reference["aliases"]
    given = {canonical(n, aliases): t for n, t in tensors.items()}
    specs = {s["fqn"]: s for s in reference["specs"]}
    extra = sorted(n for n in tensors if canonical(n, aliases) not in specs)
    if extra:
        return (
            f"rank {rank} (the source) holds {len(extra)} weight(s) the replicas' model does not "
            f"have, e.g. {extra[:4]}; sync a model of the compiled architecture"
        )
    module = isinstance(weights, torch.nn.Module)
    for fqn, spec in specs.items():
        value = given.get(canonical(fqn, aliases))
        if value is None:
            if spec["persistent"] or (module and spec["kind"] == "buffer"):
                return (
                    f"rank {rank} (the source) lacks weight {fqn!r} ({spec['kind']} of "
                    f"{spec['dtype']}{spec['shape']}), which the replicas need; give every "
                    "parameter and persistent buffer of the compiled model"
                )
            continue
        if list(value.shape) != spec["shape"] or dtype_name(value.dtype) != spec["dtype"]:
            return (
                f"rank {rank} (the source) holds {fqn!r} as {dtype_name(value.dtype)}"
                f"{list(value.shape)}; the replicas were compiled from {spec['dtype']}"
                f"{spec['shape']}. Sync weights of the compiled architecture and dtype"
            )
    return ""


def check_replica(rank: int, mine: dict[str, Any], reference: dict[str, Any]) -> str:
    """A replica against the reference replica: the same weights (names, shapes, dtypes).

    Another graph over the same weights (another batch size, say) is a valid target, since
    the wire carries weights only: it is logged, not refused."""
    ours = {s["fqn"]: s for s in mine["specs"]}
    theirs = {s["fqn"]: s for s in reference["specs"]}
    ref = reference["rank"]
    differ = sorted(set(ours) ^ set(theirs))
    if differ:
        fqn = differ[0]
        holder, lacker = (rank, ref) if fqn in ours else (ref, rank)
        return (
            f"rank {rank}'s compiled model differs from rank {ref}'s: weight {fqn!r} exists on "
            f"rank {holder} but not on rank {lacker}; compile every replica from one architecture"
        )
    for fqn, spec in theirs.items():
        other = ours[fqn]
        if (other["shape"], other["dtype"]) != (spec["shape"], spec["dtype"]):
            return (
                f"rank {rank}'s compiled model differs from rank {ref}'s: weight {fqn!r} is "
                f"{other['dtype']}{other['shape']} on rank {rank} and "
                f"{spec['dtype']}{spec['shape']} "
                f"on rank {ref}; compile every replica from one architecture"
            )
    if mine["structure"] != reference["structure"]:
        logger.info(
            "rank %d's compiled graph differs from rank %d's over the same weights", rank, ref
        )
    return ""


def reference_of(described: list[dict[str, Any]]) -> dict[str, Any]:
    """The replica that defines the layout: the lowest-ranked one (none: an empty layout)."""
    replicas = [d for d in described if d["role"] == "replica"]
    if not replicas:
        return {"rank": -1, "specs": [], "aliases": {}, "structure": ""}
    return min(replicas, key=lambda d: d["rank"])


def pack(
    tensors: dict[str, torch.Tensor], aliases: dict[str, str], views: dict[str, torch.Tensor]
) -> None:
    """The source's current values into its send buffers' views: one batched copy per
    device; a tensor already in its view (after rehome) is not copied."""
    pairs: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    packed: set[str] = set()
    for name, tensor in full_tensors(tensors):
        fqn = aliases.get(name, name)
        view = views.get(fqn)
        if view is None or fqn in packed:
            continue
        packed.add(fqn)
        check_bound(fqn, tensor, view)
        if not same_memory(view, tensor):
            dsts, srcs = pairs.setdefault(tensor.device, ([], []))
            dsts.append(view)
            srcs.append(tensor)
    missing = set(views) - packed
    if missing:
        raise WeightSyncError(
            f"The source no longer holds {sorted(missing)[:4]}; it did when the WeightSync was "
            "made. Make a new WeightSync on every rank."
        )
    with torch.no_grad():
        for dsts, srcs in pairs.values():
            torch._foreach_copy_(dsts, srcs)


def rehome(
    module: torch.nn.Module,
    specs: dict[str, WeightSpec],
    aliases: dict[str, str],
    views: dict[str, torch.Tensor],
) -> None:
    """The module's parameters and buffers moved into the send buffers' views
    (`tensor.data = view`), their values kept."""
    tensors = module_tensors(module, specs)
    for name, tensor in originals(module, tensors):
        view = views.get(aliases.get(name, name))
        if view is None or is_dtensor(tensor) or same_memory(view, tensor):
            continue
        if tensor.device != view.device:
            raise TorchRefitError(
                f"rehome() cannot move {name!r}: it is on {tensor.device}, the send buffer on "
                f"{view.device}. Move the model to {view.device} first."
            )
        with torch.no_grad():
            view.copy_(tensor)
        tensor.data = view


def check_bound(fqn: str, tensor: torch.Tensor, view: torch.Tensor) -> None:
    if tensor.dtype != view.dtype:
        raise WeightDtypeError(
            f"Source weight {fqn!r} is now {tensor.dtype}; it was {view.dtype} when the "
            "WeightSync was made. Make a new WeightSync on every rank."
        )
    if tensor.shape != view.shape:
        raise WeightShapeError(
            f"Source weight {fqn!r} now has shape {list(tensor.shape)}; it had "
            f"{list(view.shape)} when the WeightSync was made. Make a new WeightSync on every rank."
        )


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def canonical(name: str, aliases: dict[str, str]) -> str:
    return aliases.get(name, name)


def usage(rank: int, message: str) -> str:
    return f"usage: rank {rank}: {message}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
