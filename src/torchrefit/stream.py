"""Refit from a safetensors file in bounded chunks: host memory stays far below its size.

Everything that can be checked before a write is checked first: names, shapes and dtypes
from the header; overflow of narrowing casts in a reading pass; derived constants computed
from their (fully read) inputs. Then each weight's bytes go from the file straight into its
engine buffer, through two small pinned buffers for a GPU (the read of one chunk overlaps
the copy of the other). If the file fails to read in the middle, the weights not written
are marked unset: the module refuses to run until a refit succeeds, rather than compute
with a half-updated mix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .errors import WeightValueError
from .module import CompiledModule, RefitState
from .read import FileTensor, NewWeights, _unreadable, index_safetensors
from .refit import Matched, _fast, _fresh_copy, _refittable, evaluate, narrows, rename, validate

logger = logging.getLogger("torchrefit")

CHUNK_BYTES = 32 << 20


def refit_from_file(
    compiled: CompiledModule,
    path: str,
    name_map: Mapping[str, str] | Callable[[str], str | None] | None,
    in_place: bool,
) -> CompiledModule | None:
    """The refitted module, or None when the file needs the general path (a tied weight
    given under both of its names must be compared by value)."""
    state = _refittable(compiled)
    index: Any = NewWeights(dict(index_safetensors(path)), "safetensors")
    if name_map is not None:
        index = rename(index, name_map)
    entries: dict[str, FileTensor] = index.tensors
    if any(a in entries and f in entries for a, f in state.aliases.items()):
        return None
    stand_ins = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in entries.items()}
    matched = _fast(NewWeights(stand_ins, "safetensors"), state)  # names, shapes, dtypes
    located = {fqn: entries[_file_name(fqn, entries, state)] for fqn in matched.tensors}
    program_inputs = set(state.weight_program.inputs)
    streamed = [f for f in located if f in state.store.tensors and f not in program_inputs]
    with open(path, "rb") as f:
        read_fully = {fqn: _read(f, located[fqn], path) for fqn in located if fqn in program_inputs}
        _check_overflow(f, path, {fqn: located[fqn] for fqn in streamed}, state)
        values = evaluate(Matched(read_fully, "fast", state.weight_program, {}), state)
        validate(values, state)
        target = compiled if in_place else _fresh_copy(compiled)
        store = target._torchrefit.store
        store.commit(values)
        pending = set(streamed)
        try:
            with _Chunks(store.device) as chunks:
                for fqn in streamed:
                    chunks.copy(f, located[fqn], store[fqn], path)
                    pending.discard(fqn)
        except BaseException:
            target._torchrefit.unset |= pending
            raise
    target._torchrefit.unset -= set(values) | set(streamed)
    logger.info("refit from %s: %d weights streamed, %d computed", path, len(streamed), len(values))
    return target


def _file_name(fqn: str, entries: dict[str, FileTensor], state: RefitState) -> str:
    """The file's name for a weight, which may be another name of the same tied tensor."""
    canonical = state.aliases.get(fqn, fqn)
    names = [fqn, canonical] + [a for a, f in state.aliases.items() if f == canonical]
    return next(n for n in names if n in entries)


def _read(f: Any, t: FileTensor, path: str) -> torch.Tensor:
    out = torch.empty(t.end - t.begin, dtype=torch.uint8)
    f.seek(t.begin)
    if f.readinto(memoryview(out.numpy())) != out.numel():
        raise _unreadable(path, ValueError("the file ends early"))
    return out.view(t.dtype).view(t.shape)


def _check_overflow(f: Any, path: str, located: dict[str, FileTensor], state: RefitState) -> None:
    """A reading pass over weights a narrowing cast could turn into inf; no write yet."""
    scratch = torch.empty(_buffer_bytes(), dtype=torch.uint8)
    for fqn, t in located.items():
        target = state.engine_dtypes[fqn]
        if not (t.dtype.is_floating_point and narrows(t.dtype, target)):
            continue
        limit = torch.finfo(target).max
        for _, chunk in _chunks_of(f, t, path, lambda: scratch):
            peak = chunk.abs().max().item() if chunk.numel() else 0.0
            if not peak <= limit:
                raise WeightValueError(
                    f"Weight {fqn!r} overflows {target} (largest magnitude {peak:.4g}); it would "
                    "become inf. Rescale it, or compile with a wider dtype."
                )


def _buffer_bytes() -> int:
    return max(CHUNK_BYTES, 8)  # room for at least one element of any dtype


def _chunks_of(
    f: Any, t: FileTensor, path: str, buffer: Callable[[], torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first element, the elements) for each chunk of `t`, read into `buffer()`:
    a chunk is valid until the next one is read."""
    item = torch.empty((), dtype=t.dtype).element_size()
    step = max(item, CHUNK_BYTES // item * item)
    for offset in range(t.begin, t.end, step):
        size = min(step, t.end - offset)
        raw = buffer()[:size]
        f.seek(offset)
        if f.readinto(memoryview(raw.numpy())) != size:
            raise _unreadable(path, ValueError("the file ends early"))
        yield (offset - t.begin) // item, raw.view(t.dtype)


class _Chunks:
    """Two reusable host buffers (pinned for a GPU); a chunk is reused once its copy is done."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        pinned = device.type == "cuda"
        self.buffers = [torch.empty(_buffer_bytes(), dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def __enter__(self) -> _Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def copy(self, f: Any, t: FileTensor, dst: torch.Tensor, path: str) -> None:
        flat = dst.view(-1)
        for first, chunk in _chunks_of(f, t, path, self._next):
            flat[first : first + chunk.numel()].copy_(chunk, non_blocking=self.device.type == "cuda")
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
