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

from ..copy_kernel import GatherCopy, gather_copy_works
from ..module import CompiledModule, clone_module
from ..weights import ALIGN_BYTES, WeightStore
from .evaluate import Values, check_written
from .files import FileTensor, buffer_bytes, chunks_of

logger = logging.getLogger("torchrefit")

CHUNK_BYTES = 16 << 20  # staged uploads start every 16 MB, overlapping the host copies


def commit(module: CompiledModule, values: Values, in_place: bool) -> CompiledModule:
    """`module` (or, with in_place=False, a new module sharing its engines) holding `values`.

    A copy gets a store of its own: each constant is copied once, from `values` or, for the
    constants the refit leaves alone, from the original."""
    if in_place:
        commit_by(module, values.keys(), lambda store: _write_values(module, store, values))
        return module
    target = _copy_for(module, values.keys())
    _write_values(target, target._torchrefit.store, values)
    return target


def commit_by(
    module: CompiledModule, keys: set[str], write_values: Callable[[WeightStore], None]
) -> None:
    """In place: `write_values(store)` writes the constants `keys` into `store`.

    Plainly, `store` is the active buffer, written while no call runs. Double-buffered, it
    is the standby: brought up to date, written while calls go on, checked there, then
    flipped to; a refused or failed refit never flips."""
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
    write_values(standby)
    check_written(standby, keys, state)
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


def _write_values(module: CompiledModule, store: WeightStore, values: Values) -> None:
    write(store, values.tensors)
    if not values.streamed:
        return
    if store is not module._torchrefit.store:
        _stream_into(store, values.streamed)  # a standby: a failure midway changes nothing
        return
    state = module._torchrefit
    pending = set(values.streamed)
    try:
        _stream_into(store, values.streamed, pending)
    except BaseException:
        # the weights not yet written are marked unset: the module refuses to run until a
        # refit succeeds, rather than compute with a half-updated mix
        state.unset |= pending
        raise


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


def copy_plan(store: WeightStore, values: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A bound copy of fixed `values` into the store, capturable as a CUDA graph: one
    gather-copy launch per arena where the kernel works, else batched copies."""
    groups: dict[
        tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]
    ] = {}
    for key, value in values.items():
        dst = store[key]
        dsts, srcs = groups.setdefault((dst.device, dst.dtype), ([], []))
        dsts.append(dst)
        srcs.append(value)
    copies: list[Callable[[], None]] = []
    for (device, dtype), (dsts, srcs) in groups.items():
        if gather_copy_works(device, dtype):
            copies.append(GatherCopy(store.arenas[(device, dtype)], dsts, srcs))
        else:
            copies.append(_batched_copy(dsts, srcs))

    def run() -> None:
        with torch.no_grad():
            for copy in copies:
                copy()

    return run


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
