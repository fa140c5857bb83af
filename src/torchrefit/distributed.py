"""WeightSync: one trainer refits many engine replicas over torch.distributed.

Every rank of a process group constructs one `WeightSync` and calls it once per update. The
source rank binds the trainer's tensors (no compiled module needed); every other rank binds
its compiled module. Construction exchanges the layout once (names, shapes, dtypes) and
checks it on every replica; a mismatch raises on every rank, naming the rank and the weight.
Each call: the source packs its current values into one flat buffer per dtype, one
broadcast per buffer lands in each replica's receive buffer, and each replica refits from
views of it through the refit core (evaluate casts to its engine dtype, validate, commit:
double-buffered modules flip). A failed or timed-out broadcast commits nothing: every
replica keeps its old weights and raises `WeightSyncError`.

The layout travels as JSON bytes in a uint8 tensor: nothing is pickled. NCCL on GPUs, Gloo
on CPU, launched with torchrun.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from .errors import IncompatibleWeightsError, WeightSyncError
from .module import CompiledModule
from .refit import refittable
from .refit.commit import commit
from .refit.evaluate import evaluate, validate
from .refit.match import fast
from .refit.read import NewWeights, module_tensors

logger = logging.getLogger("torchrefit")

MESSAGE_BYTES = 1024


class WeightSync:
    """`WeightSync(compiled=..., src=0)` on replicas, `WeightSync(weights=model, src=0)` on
    the source; then `sync()` on every rank, once per update."""

    def __init__(
        self,
        compiled: CompiledModule | None = None,
        weights: Any = None,
        src: int = 0,
        group: Any = None,
        timeout: datetime.timedelta | float | None = None,
    ) -> None:
        self.group, self.src = group, src
        self.rank = dist.get_rank(group)
        self.timeout = (
            timeout
            if timeout is None or isinstance(timeout, datetime.timedelta)
            else (datetime.timedelta(seconds=float(timeout)))
        )
        self.is_source = self.rank == src
        backend = dist.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )
        if self.is_source:
            if weights is None:
                raise WeightSyncError(
                    f"Rank {self.rank} is the source: pass weights= (an nn.Module or a state_dict)."
                )
            self.tensors = _source_tensors(weights)
            layout = [
                [k, list(t.shape), str(t.dtype).removeprefix("torch.")]
                for k, t in self.tensors.items()
            ]
        else:
            if compiled is None:
                raise WeightSyncError(
                    f"Rank {self.rank} is a replica: pass compiled= (a CompiledModule)."
                )
            self.module, self.state = compiled, refittable(compiled)
            layout = []
        self.layout = _broadcast_json(layout, src, group, self.device)
        self._check_layout()
        self.buffers, self.views = _buffers(self.layout, self.device)

    def _check_layout(self) -> None:
        """Every replica checks the source's layout; all ranks fail together, naming each."""
        problem = "" if self.is_source else _mismatch(self.layout, self.state, self.rank)
        message = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        encoded = problem.encode()[:MESSAGE_BYTES]
        message[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        gathered = [torch.zeros_like(message) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, message, group=self.group)
        problems = [
            bytes(m.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for m in gathered
        ]
        problems = [p for p in problems if p]
        if problems:
            raise IncompatibleWeightsError("; ".join(problems))

    def __call__(self) -> None:
        """One update: the source's current values into every replica, all or nothing."""
        if self.is_source:
            with torch.no_grad():
                for names in _by_dtype(self.layout).values():
                    torch._foreach_copy_(
                        [self.views[n] for n in names],
                        [self.tensors[n].to(self.device) for n in names],
                    )
        try:
            for buffer in self.buffers.values():
                work = dist.broadcast(buffer, self.src, group=self.group, async_op=True)
                if work is not None:
                    work.wait(self.timeout) if self.timeout is not None else work.wait()
        except (RuntimeError, dist.DistBackendError) as exc:  # a dead source, a timeout
            raise WeightSyncError(
                f"Rank {self.rank}: the weight broadcast from rank {self.src} failed ({exc}); "
                "this replica keeps its old weights. Restart the group, then sync again."
            ) from exc
        if self.is_source:
            return
        with self.state.guard.refit:  # the refit core, as for any refit
            matched = fast(NewWeights(dict(self.views), "state_dict"), self.state)
            values = evaluate(matched, self.state)
            validate(values, self.state)
            commit(self.module, values, in_place=True)

    sync = __call__


def _source_tensors(weights: Any) -> dict[str, torch.Tensor]:
    tensors = module_tensors(weights, {}) if isinstance(weights, torch.nn.Module) else dict(weights)
    out = {}
    for name, tensor in tensors.items():
        full = getattr(tensor, "full_tensor", None)  # a DTensor (FSDP2): its whole value
        out[name] = full() if callable(full) else tensor
    return out


def _broadcast_json(value: Any, src: int, group: Any, device: torch.device) -> Any:
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src, group=group)
    if dist.get_rank(group) != src:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src, group=group)
    return json.loads(bytes(data.cpu().tolist()).decode())


def _mismatch(layout: list[list[Any]], state: Any, rank: int) -> str:
    given = {name: (tuple(shape), dtype) for name, shape, dtype in layout}
    for fqn, spec in state.specs.items():
        name = (
            fqn
            if fqn in given
            else next((a for a, f in state.aliases.items() if f == fqn and a in given), None)
        )
        if name is None:
            if spec.persistent:
                return f"rank {rank}: the source lacks weight {fqn!r}"
            continue
        shape, dtype = given[name]
        if shape != spec.shape or dtype != spec.dtype:
            return (
                f"rank {rank}: weight {fqn!r} is {dtype}{list(shape)} on the source and "
                f"{spec.dtype}{list(spec.shape)} in this replica's compiled module"
            )
    extra = sorted(set(given) - set(state.specs) - set(state.aliases))
    return (
        f"rank {rank}: the source sends {extra[:3]}, which this replica does not have"
        if extra
        else ""
    )


def _by_dtype(layout: list[list[Any]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, _, dtype in layout:
        groups.setdefault(dtype, []).append(name)
    return groups


def _buffers(
    layout: list[list[Any]], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One flat buffer per dtype (one broadcast each) and each weight's view into it."""
    buffers: dict[str, torch.Tensor] = {}
    views: dict[str, torch.Tensor] = {}
    shapes = {name: shape for name, shape, _ in layout}
    for dtype, names in _by_dtype(layout).items():
        sizes = [max(1, int(torch.Size(shapes[n]).numel())) if shapes[n] else 1 for n in names]
        buffer = torch.empty(sum(sizes), dtype=getattr(torch, dtype), device=device)
        buffers[dtype] = buffer
        offset = 0
        for name, size in zip(names, sizes, strict=True):
            numel = int(torch.Size(shapes[name]).numel())
            views[name] = buffer[offset : offset + numel].view(shapes[name])
            offset += size
    return buffers, views
