"""WeightSync: one trainer refits many compiled replicas over torch.distributed.

Every rank of a group makes one `WeightSync` and calls it once per update. The source rank
packs the trainer's current values into one flat send buffer per dtype (no copy for
parameters `rehome()` moved there); one broadcast per buffer lands in each replica's
receive buffer, a standby copy beside the engines; replicas then refit from views of that
buffer through the core stages (evaluate, validate, commit), so the cast to the engine
dtype runs once, on the receiving side, and nothing is written into an engine before the
whole broadcast has arrived and validated. NCCL on GPUs, Gloo on CPU; launch with torchrun.

The layout (names, shapes, dtypes, offsets) is exchanged and checked once, at
construction, as JSON bytes in uint8 tensors: nothing is ever unpickled.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import (
    IncompatibleWeightsError,
    TorchRefitError,
    WeightDtypeError,
    WeightShapeError,
    WeightSyncError,
)
from .export import WeightSpec, dtype_name, parse_dtype
from .module import CompiledModule, RefitState
from .refit import refittable
from .refit.commit import commit
from .refit.evaluate import evaluate, validate
from .refit.match import Matched, fast
from .refit.read import NewWeights, module_tensors
from .weights import ALIGN_BYTES

logger = logging.getLogger("torchrefit")

Timeout = datetime.timedelta | float | int | None


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


class WeightSync:
    """`WeightSync(compiled=..., weights=..., src=0)()` moves the source's weights into
    every replica: one broadcast per dtype, then an all-or-nothing refit on each replica.

    The source rank (`src`, a global rank) passes `weights` (an nn.Module or a state_dict,
    DTensors allowed); every other rank of `group` passes `compiled`, a module that
    torchrefit compiled or loaded. `timeout` (a timedelta or seconds; default: the group's)
    bounds each sync's broadcasts: one that fails or times out raises WeightSyncError and
    leaves the replica on its previous weights. Construction waits for every rank (replicas
    may still be compiling) up to the group's own timeout.
    """

    def __init__(
        self,
        compiled: CompiledModule | None = None,
        weights: Any = None,
        src: int = 0,
        group: dist.ProcessGroup | None = None,
        timeout: Timeout = None,
    ) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.src = src
        self.rank = dist.get_rank()
        self.is_source = self.rank == src
        self.device = _comm_device(self.group)
        self.timeout = _timeout(timeout, self.group, self.device)
        # construction is a rendezvous (replicas may still be compiling): the group's timeout
        self._setup_timeout = _timeout(None, self.group, self.device)
        self.compiled, self.weights = compiled, weights
        self.state: RefitState | None = None
        if src not in dist.get_process_group_ranks(self.group):
            raise TorchRefitError(
                f"WeightSync got src={src}, which is not a rank of the group "
                f"{dist.get_process_group_ranks(self.group)}; src is a global rank."
            )
        self._described = self._describe()
        reference, names = self._exchange()
        self.specs = [WeightSpec.from_json(s) for s in reference["specs"]]
        self.spec_map = {s.fqn: s for s in self.specs}
        self.aliases: dict[str, str] = dict(reference["aliases"])
        self.layout = plan(self.specs, names)
        self.buffers = {
            d: torch.empty(max(n, 1), dtype=parse_dtype(d), device=self.device)
            for d, n in self.layout.sizes.items()
        }
        self.views = {
            s.name: self._view(d, s) for d, slots in self.layout.slots.items() for s in slots
        }
        self.matched: Matched | None = None
        digests = self._agree(
            {"error": self._bind(), "digest": self.layout.digest()}, "the layout agreement"
        )
        if len({d["digest"] for d in digests}) != 1:
            raise WeightSyncError(
                "The ranks computed different wire layouts from one exchange; run one torchrefit "
                "version on every rank."
            )
        logger.info(
            "weight sync bound: %d weights, %.1f MB in %d buffer(s)",
            len(names),
            self.layout.nbytes() / 1e6,
            len(self.buffers),
        )

    def _exchange(self) -> tuple[dict[str, Any], list[str]]:
        """The reference replica's description and the names the source sends, once every
        rank has accepted them (else every rank raises, naming the rank and the weight)."""
        reference = _reference(self._agree(self._described, "the layout exchange"))
        error = self._check(reference)
        names = self._names(reference) if not error else None
        checked = self._agree({"error": error, "names": names}, "the layout check")
        return reference, next(c["names"] for c in checked if c["names"] is not None)

    def __call__(self) -> None:
        """One update: the source's current values into every replica's engines."""
        started = time.perf_counter()
        if self.is_source:
            self._pack()
        works = [
            dist.broadcast(buf, src=self.src, group=self.group, async_op=True)
            for buf in self.buffers.values()
        ]
        self._wait(works, "the weight broadcast", self.timeout, _KEPT)
        if self.matched is not None and self.state is not None and self.compiled is not None:
            values = evaluate(self.matched, self.state)
            validate(values, self.state)
            commit(self.compiled, values, in_place=True)
        logger.debug(
            "weight sync on rank %d took %.2f ms", self.rank, 1e3 * (time.perf_counter() - started)
        )

    def rehome(self) -> None:
        """Source only: move the trainer's parameters and buffers into the send buffers
        (`tensor.data = view`), so a sync copies nothing before broadcasting. Call after
        moving the model to its device and dtype, before building the optimizer (fused
        optimizers may cache addresses)."""
        if not self.is_source or not isinstance(self.weights, torch.nn.Module):
            raise TorchRefitError(
                "rehome() moves an nn.Module's tensors; call it on the source rank of a module."
            )
        tensors = module_tensors(self.weights, self.spec_map)
        for name, tensor in _originals(self.weights, tensors):
            view = self.views.get(self.aliases.get(name, name))
            if view is None or _is_dtensor(tensor) or _same_memory(view, tensor):
                continue
            if tensor.device != view.device:
                raise TorchRefitError(
                    f"rehome() cannot move {name!r}: it is on {tensor.device}, the send buffer on "
                    f"{view.device}. Move the model to {view.device} first."
                )
            with torch.no_grad():
                view.copy_(tensor)
            tensor.data = view

    def _describe(self) -> dict[str, Any]:
        """What this rank holds, as JSON-able data."""
        if self.is_source:
            error = (
                ""
                if self.weights is not None
                else _usage(
                    self.rank, "the source rank needs weights= (an nn.Module or a state_dict)"
                )
            )
            return {"rank": self.rank, "role": "source", "error": error}
        try:
            self.state = refittable(self.compiled)
        except TorchRefitError as e:
            return {"rank": self.rank, "role": "replica", "error": _usage(self.rank, str(e))}
        if self.state.store.device != self.device and self.device.type == "cuda":
            error = _usage(
                self.rank,
                f"the engines are on {self.state.store.device} but NCCL sends to {self.device}; "
                "call torch.cuda.set_device(local_rank) before compiling",
            )
            return {"rank": self.rank, "role": "replica", "error": error}
        return {
            "rank": self.rank,
            "role": "replica",
            "error": "",
            "structure": hashlib.sha256("\n".join(self.state.structure).encode()).hexdigest(),
            "specs": [s.to_json() for s in self.state.specs.values()],
            "aliases": self.state.aliases,
        }

    def _check(self, reference: dict[str, Any]) -> str:
        """This rank's disagreement with the reference replica, or ""."""
        if self.is_source:
            return _check_source(self.rank, self.weights, reference)
        return _check_replica(self.rank, self._described, reference)

    def _names(self, reference: dict[str, Any]) -> list[str] | None:
        """The weights the source sends (canonical FQNs: a tied weight once); None on replicas."""
        if not self.is_source:
            return None
        aliases = reference["aliases"]
        given = {
            _canonical(n, aliases) for n in _source_tensors(self.weights, _spec_map(reference))
        }
        return [
            s["fqn"] for s in reference["specs"] if s["fqn"] in given and s["fqn"] not in aliases
        ]

    def _view(self, dtype: str, slot: Slot) -> torch.Tensor:
        return self.buffers[dtype][slot.offset : slot.offset + slot.numel].view(slot.shape)

    def _bind(self) -> str:
        """Replicas: the refit core's match stage, once, over views of the receive buffer."""
        if self.is_source or self.state is None:
            return ""
        try:
            self.matched = fast(NewWeights(dict(self.views), "state_dict"), self.state)
        except TorchRefitError as e:
            return f"rank {self.rank}: {e}"
        return ""

    def _pack(self) -> None:
        """The source's current values into the send buffers: one batched copy per device."""
        pairs: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        packed: set[str] = set()
        for name, tensor in _full_tensors(_source_tensors(self.weights, self.spec_map)):
            fqn = self.aliases.get(name, name)
            view = self.views.get(fqn)
            if view is None or fqn in packed:
                continue
            packed.add(fqn)
            _check_bound(fqn, tensor, view)
            if not _same_memory(view, tensor):
                dsts, srcs = pairs.setdefault(tensor.device, ([], []))
                dsts.append(view)
                srcs.append(tensor)
        missing = set(self.views) - packed
        if missing:
            raise WeightSyncError(
                f"The source no longer holds {sorted(missing)[:4]}; it did when the WeightSync was "
                "made. Make a new WeightSync on every rank."
            )
        with torch.no_grad():
            for dsts, srcs in pairs.values():
                torch._foreach_copy_(dsts, srcs)

    def _agree(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """Every rank's payload, in group rank order; raises on every rank if any rank erred."""
        gathered = self._gather_json(payload, what)
        errors = [p for p in gathered if p.get("error")]
        if errors:
            messages = "; ".join(p["error"] for p in errors)
            usage = all(p["error"].startswith("usage: ") for p in errors)
            kind = TorchRefitError if usage else IncompatibleWeightsError
            raise kind(f"WeightSync refused during {what}: {messages}")
        return gathered

    def _gather_json(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        data = torch.frombuffer(bytearray(json.dumps(payload).encode()), dtype=torch.uint8).to(
            self.device
        )
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(self.group))]
        self._wait(
            [dist.all_gather(sizes, size, group=self.group, async_op=True)],
            what,
            self._setup_timeout,
            _REMAKE,
        )
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: data.numel()] = data
        chunks = [torch.empty_like(padded) for _ in sizes]
        self._wait(
            [dist.all_gather(chunks, padded, group=self.group, async_op=True)],
            what,
            self._setup_timeout,
            _REMAKE,
        )
        return [
            json.loads(bytes(c[: int(s.item())].cpu().numpy()))
            for c, s in zip(chunks, sizes, strict=True)
        ]

    def _wait(self, works: list[Any], what: str, timeout: datetime.timedelta, then: str) -> None:
        """Wait for every collective within `timeout`; a failure is a WeightSyncError."""
        deadline = time.monotonic() + timeout.total_seconds()
        try:
            for work in works:
                left = max(deadline - time.monotonic(), 1e-3)
                work.wait(datetime.timedelta(seconds=left))
        except RuntimeError as e:
            raise WeightSyncError(
                f"{what} failed on rank {self.rank} (source: rank {self.src}, timeout "
                f"{timeout.total_seconds():g} s): {e}. {then}"
            ) from e


_KEPT = (
    "The engines keep their previous weights. A rank may have died or stalled: make a new "
    "process group and WeightSync on every rank before syncing again."
)
_REMAKE = (
    "A rank may have died or stalled: make a new process group, then a WeightSync on every rank."
)


def gather_shards(weights: Any) -> None:
    """On a trainer rank that holds DTensor shards but is not the source: take part in
    gathering the full weights. Call it once per sync, while the source calls its sync()."""
    for _ in _full_tensors(_plain_tensors(weights)):
        pass


def _source_tensors(weights: Any, specs: dict[str, WeightSpec]) -> dict[str, torch.Tensor]:
    """The source's tensors by name: a module's parameters, buffers and lifted constants."""
    if isinstance(weights, torch.nn.Module):
        return module_tensors(weights, specs)
    return _plain_tensors(weights)


def _spec_map(reference: dict[str, Any]) -> dict[str, WeightSpec]:
    return {s["fqn"]: WeightSpec.from_json(s) for s in reference["specs"]}


def _plain_tensors(weights: Any) -> dict[str, torch.Tensor]:
    if isinstance(weights, torch.nn.Module):
        return module_tensors(weights, {})
    if isinstance(weights, Mapping):
        return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    raise TorchRefitError(
        f"WeightSync got weights of type {type(weights).__name__}; expected an nn.Module or a "
        "state_dict (FQN -> tensor)."
    )


def _full_tensors(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in order, a DTensor gathered to its full value (a collective over its
    mesh: every rank of the mesh runs this same loop); a tied DTensor is gathered once."""
    counts: dict[int, int] = {}
    for tensor in tensors.values():
        if _is_dtensor(tensor):
            counts[_local_ptr(tensor)] = counts.get(_local_ptr(tensor), 0) + 1
    kept: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not _is_dtensor(tensor):
            yield name, tensor
            continue
        ptr = _local_ptr(tensor)
        full = kept.get(ptr)
        if full is None:
            full = _full(tensor)
            if counts[ptr] > 1:
                kept[ptr] = full
        yield name, full


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor; never imports torch.distributed.tensor (half a second),
    since a DTensor exists only once that module has been imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _full(tensor: Any) -> torch.Tensor:
    return tensor.full_tensor()


def _local_ptr(tensor: Any) -> int:
    return int(tensor.to_local().data_ptr())


def _originals(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own tensor objects (not detached copies) under the names given."""
    for name in tensors:
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        value = getattr(owner, attr, None)
        if isinstance(value, torch.Tensor):
            yield name, value


def _check_source(rank: int, weights: Any, reference: dict[str, Any]) -> str:
    """The source against the replicas' weights: every needed name, shape and dtype."""
    try:
        tensors = _source_tensors(weights, _spec_map(reference))
    except TorchRefitError as e:
        return _usage(rank, str(e))
    aliases = reference["aliases"]
    given = {_canonical(n, aliases): t for n, t in tensors.items()}
    specs = {s["fqn"]: s for s in reference["specs"]}
    extra = sorted(n for n in tensors if _canonical(n, aliases) not in specs)
    if extra:
        return (
            f"rank {rank} (the source) holds {len(extra)} weight(s) the replicas' model does not "
            f"have, e.g. {extra[:4]}; sync a model of the compiled architecture"
        )
    module = isinstance(weights, torch.nn.Module)
    for fqn, spec in specs.items():
        value = given.get(_canonical(fqn, aliases))
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


def _check_replica(rank: int, mine: dict[str, Any], reference: dict[str, Any]) -> str:
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


def _reference(described: list[dict[str, Any]]) -> dict[str, Any]:
    """The replica that defines the layout: the lowest-ranked one (none: an empty layout)."""
    replicas = [d for d in described if d["role"] == "replica"]
    if not replicas:
        return {"rank": -1, "specs": [], "aliases": {}, "structure": ""}
    return min(replicas, key=lambda d: d["rank"])


def _check_bound(fqn: str, tensor: torch.Tensor, view: torch.Tensor) -> None:
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


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def _canonical(name: str, aliases: dict[str, str]) -> str:
    return aliases.get(name, name)


def _usage(rank: int, message: str) -> str:
    return f"usage: rank {rank}: {message}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _comm_device(group: Any) -> torch.device:
    """Where the group's collectives run: this rank's current GPU for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _timeout(timeout: Timeout, group: Any, device: torch.device) -> datetime.timedelta:
    """`timeout` as a timedelta; None: the group's own timeout (its backend's default when
    it cannot be read)."""
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout is not None:
        return datetime.timedelta(seconds=float(timeout))
    try:
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return dist.distributed_c10d._get_default_timeout(
            dist.Backend(str(dist.get_backend(group)))
        )


__all__ = ["WeightSync", "gather_shards"]
