"""The commit stage: the only code that writes new values into a weight store.

Call only after validation. Same-device values go in batched copies. Pinned host values
are copied straight in, asynchronously; pageable ones go through a pinned mirror of the
arena in contiguous runs, so a few hundred small weights cost a few large transfers. File
weights stream from the file into their buffers through two reusable host buffers (pinned
for a GPU: the read of one chunk overlaps the copy of the other).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from io import BufferedReader
from typing import Any

import torch

from ..copy_kernel import GatherCopy, finite_kernels_work, gather_copy_works
from ..module import CompiledModule, clone_module
from ..weights import ALIGN_BYTES, WeightStore
from .evaluate import Flagged, Values, check_written
from .files import FileTensor, buffer_bytes, chunks_of

logger = logging.getLogger("torchrefit")

CHUNK_BYTES = 16 << 20  # staged uploads start every 16 MB, overlapping the host copies


def commit(module: CompiledModule, values: Values, in_place: bool) -> CompiledModule:
    """`module` (or, with in_place=False, a new module sharing its engines) holding `values`.

    A copy gets a store of its own: each constant is copied once, from `values` or, for the
    constants the refit leaves alone, from the original. A double-buffered module's values
    are checked once written, in a copy as in its standby."""
    if in_place:
        commit_by(module, values.keys(), lambda store: _write_values(module, store, values))
        return module
    target = _copy_for(module, values.keys())
    state = target._torchrefit
    flagged = _write_values(target, state.store, values)
    if state.settings.double_buffer:  # validate left the finiteness check to this point
        check_written(state.store, values.keys(), state, flagged)
    return target


def commit_by(
    module: CompiledModule,
    keys: set[str],
    write_values: Callable[[WeightStore], Flagged | None],
) -> None:
    """In place: `write_values(store)` writes the constants `keys` into `store`.

    Plainly, `store` is the active buffer, written while no call runs. Double-buffered, it
    is the standby: brought up to date, written while calls go on, checked there (what a
    flagged copy wrote, by the flag `write_values` returns), then flipped to; a refused or
    failed refit never flips."""
    state = module._torchrefit
    active = state.store
    if not state.settings.double_buffer:
        with state.guard.writing(active.device):
            write_values(active)
        state.unset -= keys
        return
    if state.standby is None:
        state.standby, state.stale = active.empty_like(), set(active.keys())
    standby = state.standby
    if active.device.type == "cuda":
        state.guard.wait_for_calls(active.device)  # calls launched before the last flip read it
    state.stale |= keys  # until the flip, the standby is a mix
    write(standby, {k: active[k] for k in state.stale - keys})
    check_written(standby, keys, state, write_values(standby))
    with state.guard.writing(active.device):
        module.bind(standby)
        state.standby, state.stale = active, set(keys)
        state.unset -= keys
    logger.debug("double buffer: flipped to the standby weights (%d constants refitted)", len(keys))


def _copy_for(module: CompiledModule, refitted: set[str]) -> CompiledModule:
    old = module._torchrefit.store
    store = old.empty_like()
    write(store, {k: t for k, t in old.tensors.items() if k not in refitted})
    return clone_module(module, store)


def _write_values(module: CompiledModule, store: WeightStore, values: Values) -> Flagged | None:
    """Write `values` into `store`. A double-buffered module checks its values once written:
    those on the store's device go through the flagged gather copy, which checks them in the
    same pass (the flag it returns); the others are read again after."""
    state = module._torchrefit
    tensors, flagged = values.tensors, None
    if state.settings.double_buffer:
        local = {k: v for k, v in tensors.items() if v.device == store[k].device}
        plan = copy_plan(store, local, state.inf_allowed)
        plan()
        flagged = plan.flagged
        tensors = {k: v for k, v in tensors.items() if k not in local}
    write(store, tensors)
    if not values.streamed:
        return flagged
    if store is not state.store:
        _stream_into(store, values.streamed)  # a standby: a failure midway changes nothing
        return flagged
    pending = set(values.streamed)
    try:
        _stream_into(store, values.streamed, pending)
    except BaseException:
        # the weights not yet written are marked unset: the module refuses to run until a
        # refit succeeds, rather than compute with a half-updated mix
        state.unset |= pending
        raise
    return flagged


def write(store: WeightStore, values: dict[str, torch.Tensor]) -> None:
    """Copy `values` into the store's buffers; returns once the sources may be reused."""
    groups: dict[
        tuple[torch.device, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]
    ] = {}
    for key, value in values.items():
        dst = store[key]
        dsts, srcs = groups.setdefault((dst.device, value.device), ([], []))
        dsts.append(dst)
        srcs.append(value)
    with torch.no_grad():
        for (dst_device, src_device), (dsts, srcs) in groups.items():
            if dst_device == src_device:
                torch._foreach_copy_(dsts, srcs)
            elif dst_device.type == "cuda" and src_device.type == "cpu":
                _from_host(store, dsts, srcs)
                torch.cuda.current_stream(dst_device).synchronize()  # callers may reuse sources
            else:
                for dst, src in zip(dsts, srcs, strict=True):
                    dst.copy_(src)


def _from_host(store: WeightStore, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    staged: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for dst, src in zip(dsts, srcs, strict=True):
        if src.is_pinned():  # the copy engine reads it directly, asynchronously
            dst.copy_(src, non_blocking=True)
        else:
            staged.setdefault((dst.device, dst.dtype), []).append((dst, src))
    for group, pairs in staged.items():
        arena, mirror = store.arenas[group], _mirror(store, group)
        item, base = arena.element_size(), arena.data_ptr()
        pairs.sort(key=lambda p: p[0].data_ptr())
        slots = [((d.data_ptr() - base) // item, d.numel()) for d, _ in pairs]
        runs = iter(upload_runs(slots, item))
        next_run = next(runs)
        for (start, numel), (dst, src) in zip(slots, pairs, strict=True):
            mirror[start : start + numel].view(dst.shape).copy_(src)
            if start + numel == next_run[1]:  # a run is filled: upload it while the CPU goes on
                arena[next_run[0] : next_run[1]].copy_(
                    mirror[next_run[0] : next_run[1]], non_blocking=True
                )
                next_run = next(runs, (0, -1))


def _mirror(store: WeightStore, group: tuple[torch.device, torch.dtype]) -> torch.Tensor:
    mirror = store.mirrors.get(group)
    if mirror is None:
        arena = store.arenas[group]
        mirror = store.mirrors[group] = torch.empty(
            arena.numel(), dtype=arena.dtype, pin_memory=True
        )
    return mirror


def _align(end: int, item: int) -> int:
    step = max(1, ALIGN_BYTES // item)
    return -(-end // step) * step


def upload_runs(slots: list[tuple[int, int]], item: int) -> list[tuple[int, int]]:
    """(start, end) element ranges covering sorted (start, numel) slots: adjacent slots
    (up to alignment padding) join, and a run closes once it holds CHUNK_BYTES."""
    runs: list[tuple[int, int]] = []
    for start, numel in slots:
        if (
            runs
            and start == _align(runs[-1][1], item)
            and (runs[-1][1] - runs[-1][0]) * item < CHUNK_BYTES
        ):
            runs[-1] = (runs[-1][0], start + numel)
        else:
            runs.append((start, start + numel))
    return runs


class CopyPlan:
    """A bound copy of fixed values into a store, capturable as a CUDA graph (its tables
    must outlive the graph). `flagged`, when the plan was asked to check: the device flag
    its gather copies set, zeroed on each call, and the keys they checked."""

    def __init__(self, copies: list[Callable[[], None]], flagged: Flagged | None) -> None:
        self.copies, self.flagged = copies, flagged

    def __call__(self) -> None:
        with torch.no_grad():
            if self.flagged is not None:
                self.flagged.flag.zero_()
            for copy in self.copies:
                copy()


def copy_plan(
    store: WeightStore, values: dict[str, torch.Tensor], inf_allowed: set[str] | None = None
) -> CopyPlan:
    """A bound copy of fixed `values` into the store: one gather-copy launch per arena where
    the kernel works, else batched copies. With `inf_allowed` (a standby's refit, checked
    once written), the gather copies also flag NaN, and inf outside `inf_allowed`."""
    groups: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
    for key, value in values.items():
        groups.setdefault((store[key].device, store[key].dtype), {})[key] = value
    allowed, flag = inf_allowed or set(), None
    if inf_allowed is not None and any(finite_kernels_work(d, t) for d, t in groups):
        flag = torch.zeros(1, dtype=torch.int32, device=store.device)
    copies: list[Callable[[], None]] = []
    covered: set[str] = set()
    for (device, dtype), group in groups.items():
        dsts, srcs = [store[k] for k in group], list(group.values())
        arena = store.arenas[(device, dtype)]
        if not gather_copy_works(device, dtype):
            copies.append(_batched_copy(dsts, srcs))
        elif flag is not None and device == flag.device and finite_kernels_work(device, dtype):
            copy = GatherCopy(arena, dsts, srcs, flag, [k not in allowed for k in group])
            covered |= {k for k, f in zip(group, copy.flagged, strict=True) if f}
            copies.append(copy)
        else:
            copies.append(GatherCopy(arena, dsts, srcs))
    return CopyPlan(copies, Flagged(flag, frozenset(covered)) if flag is not None else None)


def _batched_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> Callable[[], None]:
    local = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device == d.device]
    remote = [(d, s) for d, s in zip(dsts, srcs, strict=True) if s.device != d.device]

    def copy() -> None:
        if local:
            torch._foreach_copy_([d for d, _ in local], [s for _, s in local])
        for d, s in remote:
            d.copy_(s, non_blocking=True)

    return copy


def _stream_into(
    store: WeightStore, streamed: dict[str, FileTensor], pending: set[str] | None = None
) -> None:
    """Each file weight's bytes straight into its buffer in `store`, cast as copied."""
    files: dict[str, BufferedReader] = {}
    try:
        with _Chunks(store.device) as chunks:
            for key, t in streamed.items():
                if t.path not in files:
                    files[t.path] = open(t.path, "rb")  # noqa: SIM115 - closed below
                chunks.copy(files[t.path], t, store[key])
                if pending is not None:
                    pending.discard(key)
    finally:
        for f in files.values():
            f.close()
    logger.info(
        "streamed %d weights from %s", len(streamed), sorted({t.path for t in streamed.values()})
    )


class _Chunks:
    """Two reusable host buffers (pinned for a GPU); a chunk is reused once its copy is done."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        pinned = device.type == "cuda"
        self.buffers = [
            torch.empty(buffer_bytes(), dtype=torch.uint8, pin_memory=pinned) for _ in range(2)
        ]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def __enter__(self) -> _Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def copy(self, f: BufferedReader, t: FileTensor, dst: torch.Tensor) -> None:
        flat = dst.view(-1)
        with torch.no_grad():
            for first, chunk in chunks_of(f, t, self._next):
                flat[first : first + chunk.numel()].copy_(
                    chunk, non_blocking=self.device.type == "cuda"
                )
                self._record()

    def _next(self) -> torch.Tensor:
        self.turn ^= 1
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer is done
        return self.buffers[self.turn]

    def _record(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.events[self.turn] = event
