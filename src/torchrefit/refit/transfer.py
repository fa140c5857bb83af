"""The write of a refit: new values into a weight store, every byte fetched once from where it
lives (a host buffer, a file), checked where it is copied.

A store is *live* when calls compute with it (a plain module's only store) and must see
nothing of a refused refit; a standby bank or a copy's new store is not. Every door's
write is one `Transfer`:

- live and checked (*staged*): values the kernel can read in place (device tensors) are
  checked there, read-only; every other value (pinned or pageable host memory, a file, a
  strided view) is read once into a bounded staging area on the store's device and checked
  there. The copy into the live store then runs gated by the check's device flag (CUDA: no
  host sync between check and copy; the one sync comes after, outside the write lock), or
  after the check (CPU). Sources larger than `Settings.staging_bytes` go through the
  staging area in batches, twice: a checking pass, then a pass that checks again and
  copies; a source that changed between the passes leaves the weights the second pass
  reached marked unset (the module refuses to run until a refit succeeds).
- otherwise (*direct*): values are written straight into the store, checked as they are
  copied (the flagged gather copy) or read back once after (torch copies, files).

`stage()` reads and checks (no write into a live store), `write()` writes (a live store's
caller holds the write lock around it), `verdict()` syncs once and raises naming the first
refused weight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from io import BufferedReader
from typing import Any, NamedTuple

import torch

from ..copy_kernel import (
    VECTOR_BYTES,
    Column,
    Slots,
    finite_kernels_work,
    gather_copy_works,
    launch,
    readable,
)
from ..errors import WeightValueError
from ..module import RefitState
from ..quantize import QUANTIZED_DTYPES
from ..weights import ALIGN_BYTES, WeightStore
from .evaluate import Values, name_streamed, raise_nonfinite, refused_on_cpu
from .evaluate import unset_note as _unset
from .files import FileTensor, buffer_bytes, chunks_of, open_weights

logger = logging.getLogger("torchrefit")

CHUNK_BYTES = 16 << 20  # host bytes staged per upload: the next chunk is read meanwhile


class Move(NamedTuple):
    """Elements [start, start + numel) of `source` to element `target` from a launch's base."""

    key: str
    source: torch.Tensor
    start: int
    target: int
    numel: int


@dataclass(frozen=True)
class _Piece:
    """A range of elements of one value, staged as a unit."""

    key: str
    source: torch.Tensor | FileTensor
    start: int
    numel: int

    @property
    def name(self) -> str:
        return f"{self.key}@{self.start}"


@dataclass
class _Batch:
    """Pieces that fit the staging area at once: per store dtype, each piece and its offset
    (in elements) in that dtype's staging buffer."""

    pieces: dict[torch.dtype, list[tuple[_Piece, int]]] = field(default_factory=dict)
    sizes: dict[torch.dtype, int] = field(default_factory=dict)

    def add(self, piece: _Piece, dtype: torch.dtype) -> None:
        step = max(1, ALIGN_BYTES // dtype.itemsize)
        at = self.sizes.get(dtype, 0)
        self.pieces.setdefault(dtype, []).append((piece, at))
        self.sizes[dtype] = at + -(-piece.numel // step) * step

    def nbytes(self) -> int:
        return sum(n * dtype.itemsize for dtype, n in self.sizes.items())

    def keys(self) -> set[str]:
        return {p.key for pieces in self.pieces.values() for p, _ in pieces}


def use_kernels(device: torch.device) -> bool:
    """Whether values for `device` go through the Triton kernels (CUDA; tests also run
    them on CPU tensors under Triton's interpreter)."""
    return device.type == "cuda"


def floating(dtype: torch.dtype) -> bool:
    """Whether the finiteness check reads values of `dtype`: floating and complex ones, not
    quantized (float8) constants, whose float32 scales it reads instead."""
    return (dtype.is_floating_point or dtype.is_complex) and dtype not in QUANTIZED_DTYPES


class Transfer:
    """One write of `values` into `store` (see the module docstring); `check`: refuse NaN,
    and inf where the compiled constant held none."""

    def __init__(
        self,
        state: RefitState,
        store: WeightStore,
        values: Values,
        *,
        check: bool,
        live: bool,
        tables: dict[Any, tuple[Slots, Column]] | None = None,
    ) -> None:
        self.state, self.store, self.values = state, store, values
        # launch tables kept between refits of the same constants (a Refitter keeps its own:
        # its captured graphs read them)
        self._own_tables = tables is not None
        self.tables: dict[Any, tuple[Slots, Column]] = (
            tables if tables is not None else store.__dict__.setdefault("_tables", {})
        )
        self.device = store.device
        self.cuda = self.device.type == "cuda"
        self.kernels = use_kernels(self.device)  # the gather kernel reads, checks and copies
        self.check, self.live = check, live
        self.staged = live and check
        self.flag = torch.zeros(1, dtype=torch.int32, device=self.device) if self.kernels else None
        self.partial: set[str] = set()  # what a failed second pass may have reached
        self._candidates: dict[str, torch.Tensor] | None = None  # where a refused value is
        self._host_sync = values.host_read  # host memory was read: sync before returning
        self._written = False  # a write into the store was launched
        self._flat: dict[int, torch.Tensor] = {}  # a strided source made flat once
        self._batches: list[_Batch] = []
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self._in_place: dict[str, torch.Tensor] = {}  # staged mode: read where they are
        self._by_torch: dict[str, torch.Tensor] = {}  # CUDA, dtypes the kernel cannot take
        if self.staged:
            self._plan_staged()

    # -- the three steps --------------------------------------------------------------------

    def stage(self) -> None:
        """Read every source once and check it; writes nothing into a live store. A check
        on the CPU (CPU engines, dtypes the kernel cannot read) refuses here already."""
        if not self.staged:
            return
        self._check_by_torch(self._by_torch)
        if self.kernels:
            self._check_in_place()
        else:
            self._check_by_torch(self._in_place)
        for batch in self._batches:
            self._fill(batch)
        if len(self._batches) > 1:  # the checking pass: a refusal raises before any write
            self._raise_if_flagged()

    def write(self) -> None:
        """The writes into the store; around a live store the caller holds the write lock.
        Into a live store, anything that fails once writing began leaves the refitted
        constants marked unset (the module refuses to run until a refit succeeds)."""
        if not self.staged:
            self._write_direct()
        elif len(self._batches) > 1:
            self._second_pass()
        else:
            try:
                self._copy_checked(self._batches[0] if self._batches else None)
            except WeightValueError:
                raise  # refused before any write: the flag gated every launch
            except BaseException:
                if self._written:
                    self.state.unset |= self.values.keys()
                raise

    def reset(self) -> None:
        """Forget what the last use found (a Transfer replayed by a Refitter's graph)."""
        self.partial.clear()
        self._candidates = None
        self._written = False

    def verdict(self) -> None:
        """One host sync; raise naming the first refused weight. A live store holds none of
        a refused refit's values, except the ones `partial` names (marked unset)."""
        if self.flag is not None and self.check:
            if bool(self.flag.item()):
                self._raise()
        elif self.cuda and self._host_sync:
            torch.cuda.current_stream(self.device).synchronize()  # callers reuse host buffers

    def capturable(self) -> bool:
        """Whether `stage` and `write` are device work alone (no host copy, no host sync),
        so that a CUDA graph can replay them."""
        if not self.cuda or self.values.streamed:
            return False
        if not self.staged:
            return all(
                v.is_cuda
                and self._kernel_takes(self.store[k].dtype)
                or (v.is_cuda and not floating(v.dtype))
                or (
                    v.is_pinned()
                    and self._kernel_takes(self.store[k].dtype)
                    and self._aligned(v, self.store[k].dtype)
                )
                for k, v in self.values.tensors.items()
            )
        pieces = [p for batch in self._batches for ps in batch.pieces.values() for p, _ in ps]
        on_device = all(
            isinstance(p.source, torch.Tensor)
            and (p.source.is_cuda or self._uva(p, self.store[p.key].dtype))
            for p in pieces
        )
        return not self._by_torch and len(self._batches) <= 1 and on_device

    # -- staged (live, checked) -------------------------------------------------------------

    def _plan_staged(self) -> None:
        """Which values are read in place and which go through the staging area, in
        batches of at most `staging_bytes`."""
        limit = self.staging_bytes()
        pieces: list[tuple[_Piece, torch.dtype]] = []
        here = self.device.index if self.cuda else -1
        dtypes = _dtypes(self.store)
        takes: dict[torch.dtype, bool] = {}
        for key, value in self.values.tensors.items():
            dtype = dtypes[key]
            where = value.get_device()
            self._host_sync |= where < 0
            taken = takes.get(dtype)
            if taken is None:
                taken = takes[dtype] = not self.kernels or self._kernel_takes(dtype)
            if not taken:
                self._by_torch[key] = value
            elif where == here and (not self.kernels or self._aligned(value, dtype)):
                self._in_place[key] = value
            else:
                pieces += [(p, dtype) for p in _split(key, value, limit)]
        for key, file in self.values.streamed.items():
            self._host_sync = True
            pieces += [(p, self.store[key].dtype) for p in _split(key, file, limit)]
        batch = _Batch()
        for piece, dtype in pieces:
            if batch.pieces and batch.nbytes() + piece.numel * dtype.itemsize > limit:
                self._batches.append(batch)
                batch = _Batch()
            batch.add(piece, dtype)
        if batch.pieces:
            self._batches.append(batch)
        for batch in self._batches:
            for dtype, n in batch.sizes.items():
                if n > self._staging.get(dtype, _NONE).numel():
                    self._staging[dtype] = _staging_buffer(self.state, dtype, n, self.device)

    def staging_bytes(self) -> int:
        return int(self.state.settings.staging_bytes)

    def _kernel_takes(self, dtype: torch.dtype) -> bool:
        """Whether the gather kernel copies (and, if floating, checks) `dtype`."""
        if not gather_copy_works(self.device, dtype):
            return False
        return not floating(dtype) or finite_kernels_work(self.device, dtype)

    def _aligned(self, value: torch.Tensor, dtype: torch.dtype) -> bool:
        return readable(value, self.device, dtype, 0)

    def _fill(self, batch: _Batch) -> None:
        """The batch's pieces into the staging buffers, checked there: pinned ones as the
        kernel copies them, the others read back once after their copy."""
        for dtype, pieces in batch.pieces.items():
            staging = self._staging[dtype]
            pinned = [(p, at) for p, at in pieces if self._uva(p, dtype)]
            rest = [(p, at) for p, at in pieces if not self._uva(p, dtype)]
            if pinned:
                moves = [Move(p.key, p.source, p.start, at, p.numel) for p, at in pinned]  # type: ignore[arg-type]
                check = self.check and floating(dtype)
                self._launch(staging, moves, ("pin", dtype), copy=True, check=check)
            _stage_host(staging, rest, self.device, self._flat)
            if rest:
                views = {p.name: staging[at : at + p.numel] for p, at in rest}
                self._check_written(views, {p.name: p.key for p, _ in rest})

    def _uva(self, piece: _Piece, dtype: torch.dtype) -> bool:
        """Whether the kernel reads this piece over unified addressing (pinned host memory)."""
        source = piece.source
        return (
            self.kernels
            and isinstance(source, torch.Tensor)
            and source.device.type == "cpu"
            and readable(source, self.device, dtype, 0)
        )

    def _check_in_place(self) -> None:
        """Device values the kernel reads where they are: one read-only launch per dtype."""
        for dtype, (keys, values) in self._in_place_groups(floating_only=True).items():
            base = self._staging.get(dtype)
            if base is None or not base.numel():
                base = self._staging[dtype] = _anchor(self.store, dtype)
            self._launch_whole(("check", dtype), base, keys, values, copy=False, check=True)

    def _in_place_groups(
        self, floating_only: bool = False
    ) -> dict[torch.dtype, tuple[list[str], list[torch.Tensor]]]:
        groups: dict[torch.dtype, tuple[list[str], list[torch.Tensor]]] = {}
        for key, value in self._in_place.items():
            dtype = value.dtype
            if floating_only and not (floating(dtype) and value.numel()):
                continue
            keys, values = groups.setdefault(dtype, ([], []))
            keys.append(key)
            values.append(value)
        return groups

    def _launch_whole(
        self,
        cache: tuple[Any, ...],
        base: torch.Tensor,
        keys: list[str],
        values: list[torch.Tensor],
        *,
        copy: bool,
        check: bool,
        cond: bool = False,
    ) -> None:
        """One launch over whole values into their own store slots (or, not copying, just
        read), its tables kept per set of constants: only the source offsets are new."""
        key = (cache, tuple(keys))
        found = self.tables.get(key)
        if found is None:
            inf_ok = self.state.inf_allowed
            rows = [
                (self._offset(self.store[k]) if copy else 0, v.numel(), k not in inf_ok)
                for k, v in zip(keys, values, strict=True)
            ]
            found = self._keep(key, (Slots(rows, self.device), Column(len(keys), self.device)))
        slots, column = found
        item, origin = base.element_size(), base.data_ptr()
        offsets = [(p - origin) // item for p in map(_DATA_PTR, values)]
        launch(base, slots, column.fill(offsets), self.flag, copy=copy, check=check, cond=cond)
        column.read()

    def _copy_checked(self, batch: _Batch | None) -> None:
        """The checked values into the live store: on CUDA one launch per arena gated by
        the check's flag; on a CPU (where a refusal raised already) torch copies."""
        if not self.kernels:
            sources = dict(self._in_place)
            if batch is not None:
                sources.update(self._staged_views(batch))
            self._written = True
            copy_into(self.store, sources)
            return
        self._written = True
        for dtype, (keys, values) in self._in_place_groups().items():
            arena = self.store.arenas[(self.device, dtype)]
            self._launch_whole(
                ("gated", dtype), arena, keys, values, copy=True, check=False, cond=True
            )
        for dtype, pieces in (batch.pieces if batch is not None else {}).items():
            staging = self._staging[dtype]
            moves = [
                Move(p.key, staging, at, self._offset(self.store[p.key]) + p.start, p.numel)
                for p, at in pieces
            ]
            arena = self.store.arenas[(self.device, dtype)]
            self._launch(arena, moves, ("gated-staged", dtype), copy=True, check=False, cond=True)
        if self._by_torch:  # torch copies cannot be gated: read the flag first
            self._raise_if_flagged()
            copy_into(self.store, self._by_torch)

    def _second_pass(self) -> None:
        """Sources larger than the staging area, read again, checked again and copied batch
        by batch, each copy gated by every check so far. A failure midway (a read error)
        leaves what this pass may have reached unset."""
        try:
            self._read_and_copy_again()
        except WeightValueError:
            raise  # `_raise` marked them
        except BaseException:
            self.state.unset |= self.partial
            raise

    def _read_and_copy_again(self) -> None:
        self.partial |= set(self._in_place) | set(self._by_torch)
        self._written = True
        self._copy_checked(None)
        for batch in self._batches:
            self.partial |= batch.keys()
            self._fill(batch)  # a CPU refusal raises here, before this batch's copy
            if not self.kernels:
                copy_into(self.store, self._staged_views(batch))
                continue
            for dtype, pieces in batch.pieces.items():
                staging = self._staging[dtype]
                moves = [
                    Move(p.key, staging, at, self._offset(self.store[p.key]) + p.start, p.numel)
                    for p, at in pieces
                ]
                arena = self.store.arenas[(self.device, dtype)]
                self._launch(arena, moves, None, copy=True, check=False, cond=True)
        # still under the write lock: what a refused second pass reached is marked unset
        # before any call can run on it
        self._raise_if_flagged()
        self.partial.clear()

    def _staged_views(self, batch: _Batch) -> dict[str, torch.Tensor]:
        """The batch's staged values by piece name (key@start)."""
        return {
            p.name: self._staging[dtype][at : at + p.numel]
            for dtype, pieces in batch.pieces.items()
            for p, at in pieces
        }

    def _offset(self, dst: torch.Tensor) -> int:
        """A store constant's offset in its arena, in elements."""
        arena = self.store.arenas[(dst.device, dst.dtype)]
        return (dst.data_ptr() - arena.data_ptr()) // dst.element_size()

    # -- direct (a standby bank, a copy's store, or unchecked) ------------------------------

    def _write_direct(self) -> None:
        """Straight into the store: device and pinned values through the gather kernel,
        checked as they are copied; others by torch and files streamed, then read back."""
        store = self.store
        kernel: dict[torch.dtype, tuple[list[str], list[torch.Tensor]]] = {}
        rest: dict[str, torch.Tensor] = {}
        dtypes = _dtypes(store)
        takes: dict[torch.dtype, bool] = {}
        for key, value in self.values.tensors.items():
            dtype = dtypes[key]
            self._host_sync |= value.get_device() < 0
            taken = takes.get(dtype)
            if taken is None:
                taken = takes[dtype] = self.kernels and self._kernel_takes(dtype)
            if taken and self._aligned(value, dtype):
                keys, values = kernel.setdefault(dtype, ([], []))
                keys.append(key)
                values.append(value)
            else:
                rest[key] = value
        for dtype, (keys, values) in kernel.items():
            arena = store.arenas[(self.device, dtype)]
            check = self.check and floating(dtype)
            self._launch_whole(("direct", check), arena, keys, values, copy=True, check=check)
        copy_into(store, rest)
        if self.values.streamed:
            self._host_sync = True
            try:
                _stream_into(store, self.values.streamed)
            except BaseException:
                if self.live:  # unchecked, straight into the live store: never serve a mix
                    self.state.unset |= set(self.values.streamed)
                raise
        if self.check:
            written = {k: store[k] for k in [*rest, *self.values.streamed]}
            self._check_written(written, {k: k for k in written})

    def _check_written(self, views: dict[str, torch.Tensor], keys: dict[str, str]) -> None:
        """Values just copied into aligned store or staging memory, read back once: on
        CUDA by the kernel where it reads their dtype, else by torch (a refusal raises)."""
        if not self.check:
            return
        views = {n: v for n, v in views.items() if floating(v.dtype) and v.numel()}
        if not views:
            return
        kernel: dict[torch.dtype, list[Move]] = {}
        by_torch: dict[str, torch.Tensor] = {}
        for name, view in views.items():
            if self.kernels and finite_kernels_work(self.device, view.dtype):
                kernel.setdefault(view.dtype, []).append(Move(keys[name], view, 0, 0, view.numel()))
            else:
                by_torch[name] = view
        for dtype, moves in kernel.items():
            self._launch(moves[0].source, moves, ("written", dtype), copy=False, check=True)
        if by_torch and refused_on_cpu(by_torch, self._inf_allowed(keys)):
            self._candidates = {keys[n]: v for n, v in by_torch.items()}
            self._raise()

    def _inf_allowed(self, keys: dict[str, str]) -> set[str]:
        return {n for n, k in keys.items() if k in self.state.inf_allowed}

    # -- launches and checks ----------------------------------------------------------------

    def _launch(
        self,
        base: torch.Tensor,
        moves: list[Move],
        cache: tuple[Any, ...] | None,
        *,
        copy: bool,
        check: bool,
        cond: bool = False,
    ) -> None:
        """One gather-kernel launch over `moves`, its tables kept for the next refit of the
        same constants (`cache`): only the source offsets are uploaded again."""
        slots, column = self._tables(base, moves, cache)
        item = base.element_size()
        origin = base.data_ptr()
        offsets = [(m.source.data_ptr() - origin) // item + m.start for m in moves]
        launch(base, slots, column.fill(offsets), self.flag, copy=copy, check=check, cond=cond)
        column.read()

    def _tables(
        self, base: torch.Tensor, moves: list[Move], cache: tuple[Any, ...] | None
    ) -> tuple[Slots, Column]:
        inf_ok = self.state.inf_allowed
        shape = tuple((m.key, m.target, m.numel) for m in moves)
        key = (cache, shape) if cache is not None else None
        found = self.tables.get(key) if key is not None else None
        if found is None:
            rows = [(m.target, m.numel, m.key not in inf_ok) for m in moves]
            found = (Slots(rows, self.device), Column(len(moves), self.device))
            if key is not None:
                self._keep(key, found)
        return found

    def _keep(self, key: Any, tables: tuple[Slots, Column]) -> tuple[Slots, Column]:
        """Keep a launch's tables for the next refit of the same constants; the oldest go
        beyond MAX_TABLES (a Refitter's own dict keeps all: its graphs read them)."""
        if not self._own_tables and len(self.tables) >= MAX_TABLES:
            self.tables.pop(next(iter(self.tables)))
        self.tables[key] = tables
        return tables

    def _check_by_torch(self, values: dict[str, torch.Tensor]) -> None:
        """Values the kernel does not read (CPU engines, other dtypes): torch reductions,
        one host sync; a refusal raises now, before anything is written."""
        checked = {k: v for k, v in values.items() if floating(v.dtype) and v.numel()}
        if checked and self.check and refused_on_cpu(checked, self.state.inf_allowed):
            self._candidates = checked
            self._raise()

    def _raise_if_flagged(self) -> None:
        if self.flag is not None and bool(self.flag.item()):
            self._raise()

    def _raise(self) -> None:
        """Name the first refused value; weights a second pass may have reached are marked
        unset first (the module refuses to run until a refit succeeds)."""
        if self.partial:
            self.state.unset |= self.partial
        partial = sorted(self.partial)
        sources = {**self.values.sources, **self.values.streamed}
        raise_nonfinite(self._refused(), sources, self.state, partial=partial)
        try:
            name_streamed(self.values, self.state)  # a file read in batches: read it again
        except WeightValueError as exc:
            raise WeightValueError(str(exc) + _unset(partial)) from None
        raise WeightValueError(
            f"A new value held NaN or inf when it was read, and no longer does (it changed "
            f"during the refit); nothing of it was kept.{_unset(partial)} Refit again once "
            "the weights stay put."
        )

    def _refused(self) -> dict[str, torch.Tensor]:
        """Where the refused value can be found: the candidates a torch check named, the
        sources read in place, the staging area of a single batch, the store's own slots
        (direct), or else the sources themselves (read again: only when refusing)."""
        if self._candidates is not None:
            return self._candidates
        if not self.staged:
            keys = self.values.keys()
            return {k: self.store[k] for k in keys if floating(self.store[k].dtype)}
        found = dict(self._in_place)
        if len(self._batches) == 1:
            for name, view in self._staged_views(self._batches[0]).items():
                found[name] = view
        else:
            found.update(self.values.tensors)
        return found


_NONE = torch.empty(0)
MAX_TABLES = 32  # launch tables kept per store (a refit of other constants makes new ones)


def _anchor(store: WeightStore, dtype: torch.dtype) -> torch.Tensor:
    """An aligned base pointer of `dtype` kept with the store: offsets from it stay the same
    from one refit to the next, so their column is not uploaded again."""
    anchors = store.__dict__.setdefault("_anchors", {})
    anchor = anchors.get(dtype)
    if anchor is None:
        anchor = anchors[dtype] = torch.empty(VECTOR_BYTES, dtype=dtype, device=store.device)
    return anchor


_DATA_PTR = torch.Tensor.data_ptr


def _dtypes(store: WeightStore) -> dict[str, torch.dtype]:
    cached = store.__dict__.get("_dtypes")
    if cached is None:
        cached = store.__dict__["_dtypes"] = {k: t.dtype for k, t in store.tensors.items()}
    return cached


def _staging_buffer(
    state: RefitState, dtype: torch.dtype, numel: int, device: torch.device
) -> torch.Tensor:
    """A staging buffer of at least `numel` elements. On a GPU the caching allocator keeps
    freed ones; host buffers are kept on the module's state (a fresh large host allocation
    costs a page fault per page)."""
    if device.type == "cuda":
        return torch.empty(numel, dtype=dtype, device=device)
    kept = state.__dict__.setdefault("_host_staging", {})
    buffer = kept.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = kept[dtype] = torch.empty(numel, dtype=dtype)
    return buffer


def _split(key: str, source: torch.Tensor | FileTensor, limit: int) -> list[_Piece]:
    """A value as pieces of at most `limit` bytes: one larger than the staging area is
    staged a range at a time."""
    numel = math.prod(source.shape)
    step = max(ALIGN_BYTES, limit // source.dtype.itemsize // ALIGN_BYTES * ALIGN_BYTES)
    if numel <= step:
        return [_Piece(key, source, 0, numel)]
    return [_Piece(key, source, at, min(step, numel - at)) for at in range(0, numel, step)]


def copy_into(store: WeightStore, values: dict[str, torch.Tensor]) -> None:
    """Torch copies into the store of whole values, or of pieces named key@start; returns
    once host sources may be reused."""
    groups: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    tensors = store.tensors
    for name, value in values.items():
        dst = tensors.get(name)
        if dst is None:  # a piece: key@start
            key, _, start = name.partition("@")
            dst = store[key].view(-1)[int(start) : int(start) + value.numel()]
            value = value.reshape(-1)
        dsts, srcs = groups.setdefault(value.get_device(), ([], []))
        dsts.append(dst)
        srcs.append(value)
    dst_device = store.device
    with torch.no_grad():
        for dsts, srcs in groups.values():
            src_device = srcs[0].device
            if dst_device == src_device:
                torch._foreach_copy_(dsts, srcs)
                continue
            for dst, src in zip(dsts, srcs, strict=True):
                if dst_device.type == "cuda" and src_device.type == "cpu" and not src.is_pinned():
                    _upload(dst, src)
                else:
                    dst.copy_(src, non_blocking=src.is_pinned())
            if dst_device.type == "cuda":
                torch.cuda.current_stream(dst_device).synchronize()  # callers may reuse sources


def _upload(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A pageable host tensor onto the device through two reusable pinned chunks (the next
    chunk is copied on the host while this one uploads)."""
    flat_src = src.reshape(-1)
    flat_dst = dst.view(-1)
    with _Chunks(dst.device, flat_src.dtype) as chunks:
        for first in range(0, flat_src.numel(), chunks.capacity):
            part = flat_src[first : first + chunks.capacity]
            buffer = chunks.next()[: part.numel()]
            buffer.copy_(part)
            flat_dst[first : first + part.numel()].copy_(buffer, non_blocking=True)
            chunks.record()


def _stage_host(
    staging: torch.Tensor,
    pieces: list[tuple[_Piece, int]],
    device: torch.device,
    flat: dict[int, torch.Tensor],
) -> None:
    """Pieces the kernel cannot read where they are (pageable or strided memory, file
    ranges) into their staging slots."""
    if not pieces:
        return

    def flattened(source: torch.Tensor) -> torch.Tensor:
        found = flat.get(id(source))
        if found is None:  # one copy of a strided tensor, whatever the number of its pieces
            found = flat[id(source)] = source.reshape(-1)
        return found

    host: list[tuple[_Piece, int]] = []
    for piece, at in pieces:
        source = piece.source
        if isinstance(source, torch.Tensor) and source.device == staging.device:
            part = flattened(source)[piece.start : piece.start + piece.numel]
            staging[at : at + piece.numel].copy_(part)  # a strided or misaligned view
        else:
            host.append((piece, at))
    if not host:
        return
    files: dict[str, BufferedReader] = {}
    try:
        with _Chunks(device, staging.dtype) as chunks:
            for piece, at in host:
                slot = staging[at : at + piece.numel]
                source = piece.source
                if isinstance(source, FileTensor):
                    if source.path not in files:
                        files[source.path] = open_weights(source.path)
                    _read_range(files[source.path], source, piece.start, slot, chunks)
                    continue
                part = flattened(source)[piece.start : piece.start + piece.numel]
                if part.is_pinned() or not slot.is_cuda:
                    slot.copy_(part, non_blocking=part.is_pinned())
                else:
                    _upload(slot, part)
    finally:
        for f in files.values():
            f.close()


def _read_range(
    f: BufferedReader, t: FileTensor, start: int, slot: torch.Tensor, chunks: _Chunks
) -> None:
    """`slot.numel()` elements of a file tensor from element `start`, cast as copied."""
    item = t.itemsize
    begin = t.begin + start * item
    ranged = FileTensor(t.path, t.dtype, (slot.numel(),), begin, begin + slot.numel() * item)
    for first, chunk in chunks_of(f, ranged, chunks.next_bytes):
        slot[first : first + chunk.numel()].copy_(chunk, non_blocking=slot.is_cuda)
        chunks.record()


def _stream_into(store: WeightStore, streamed: dict[str, FileTensor]) -> None:
    """Each file weight's bytes straight into its buffer in `store`, cast as copied."""
    files: dict[str, BufferedReader] = {}
    try:
        with _Chunks(store.device, torch.uint8) as chunks:
            for key, t in streamed.items():
                if t.path not in files:
                    files[t.path] = open_weights(t.path)
                _read_range(files[t.path], t, 0, store[key].view(-1), chunks)
    finally:
        for f in files.values():
            f.close()
    logger.info(
        "streamed %d weights from %s", len(streamed), sorted({t.path for t in streamed.values()})
    )


class _Chunks:
    """Two reusable host buffers (pinned for a GPU); a buffer is reused once the copy that
    last read it is done, so reading the next chunk overlaps the upload of this one."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        pinned = device.type == "cuda"
        size = max(buffer_bytes(), CHUNK_BYTES)
        self.raw = [torch.empty(size, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self.dtype = dtype
        self.capacity = size // dtype.itemsize
        self.events: list[Any] = [None, None]
        self.turn = 0

    def __enter__(self) -> _Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def next_bytes(self) -> torch.Tensor:
        self.turn ^= 1
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer is done
        return self.raw[self.turn]

    def next(self) -> torch.Tensor:
        return self.next_bytes()[: self.capacity * self.dtype.itemsize].view(self.dtype)

    def record(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.events[self.turn] = event
