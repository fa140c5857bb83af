"""One kernel launch that copies many tensors into the weight arena, at memory speed; and
the finiteness check, read-only or fused into that copy.

`torch._foreach_copy_` reaches about a third of a flat copy's bandwidth for a model's
few hundred weights (ResNet-50 on an H200: 0.14 ms against 0.039 ms). This kernel copies
every source into its slot of one arena in a single launch of large, 16-byte-vectorized
blocks. Sources are addressed as element offsets from the arena itself, so Triton sees an
aligned base pointer. Sources may be pinned host tensors, read over unified addressing
(one kernel instead of a transfer per tensor). Only CUDA; callers fall back to batched
copies when it is absent.

The check has the same shape: one launch per dtype reads many tensors (`FiniteCheck`), or
the copy checks what it copies (`GatherCopy` with a flag), and sets a device flag when a
value is NaN, or inf where inf is refused. `torch._foreach_norm(..., inf)` read at about
half memory speed. A value is judged by its bits: all exponent bits set is inf or NaN, and
NaN if the mantissa is not zero besides. Neither syncs with the host; both are capturable
in a CUDA graph once made.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("torchrefit")

BLOCK = 8192  # elements per program
VECTOR_BYTES = 16
# the dtypes the check kernels read: bit width, exponent bits, mantissa bits
FLOAT_BITS: dict[torch.dtype, tuple[int, int, int]] = {
    torch.float16: (16, 0x7C00, 0x03FF),
    torch.bfloat16: (16, 0x7F80, 0x007F),
    torch.float32: (32, 0x7F800000, 0x007FFFFF),
}

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_copy(
        arena,
        block_tensor,
        block_start,
        src_offset,
        dst_offset,
        numel,
        BLOCK: tl.constexpr,
        VEC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
        n = tl.multiple_of(tl.load(numel + t), VEC)
        src = tl.multiple_of(tl.load(src_offset + t), VEC)
        dst = tl.multiple_of(tl.load(dst_offset + t), VEC)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        values = tl.load(arena + src + offs, mask=mask)
        tl.store(arena + dst + offs, values, mask=mask)

    @triton.jit
    def _gather_check(
        base,
        block_tensor,
        block_start,
        src_offset,
        dst_offset,
        numel,
        strict,
        flag,
        BLOCK: tl.constexpr,
        VEC: tl.constexpr,
        COPY: tl.constexpr,
        BITS: tl.constexpr,
        EXP: tl.constexpr,
        MANT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
        n = tl.load(numel + t)  # any size: a tensor's last block is masked
        src = tl.multiple_of(tl.load(src_offset + t), VEC)
        dst = tl.multiple_of(tl.load(dst_offset + t), VEC)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:  # a whole block: unmasked 16-byte vectors
            values = tl.load(base + src + offs)
            if COPY:
                tl.store(base + dst + offs, values)
        else:
            mask = offs < n
            values = tl.load(base + src + offs, mask=mask, other=0)
            if COPY:
                tl.store(base + dst + offs, values, mask=mask)
        if BITS == 16:
            bits = values.to(tl.int16, bitcast=True).to(tl.int32)
        else:
            bits = values.to(tl.int32, bitcast=True)
        special = (bits & EXP) == EXP  # inf or NaN
        refused = special & ((tl.load(strict + t) != 0) | ((bits & MANT) != 0))
        # one reduction per block: a masked store per element instead ran at half the speed
        # (the check of 2.47 GB on an H200: 1.71 ms against 0.78 ms)
        bad = tl.max(refused.to(tl.int32), axis=0)
        tl.store(flag, bad, mask=bad > 0)  # no write, no atomic, while all is well

    HAVE_TRITON = True
except ImportError:  # the CPU wheel has no Triton
    HAVE_TRITON = False


@dataclass(frozen=True)
class _Plan:
    """A launch's tables on the device: per block its tensor and first element; per tensor
    its source and target offsets, size and whether inf is refused."""

    tables: tuple[torch.Tensor, ...]
    grid: tuple[int]


def _plan(entries: Sequence[tuple[int, int, int, bool]], device: torch.device) -> _Plan | None:
    """The tables of (src offset, dst offset, numel, strict) entries, uploaded at once, without
    a host sync; None when there is nothing to read."""
    columns = [torch.tensor(col, dtype=torch.int64) for col in zip(*entries, strict=True)]
    numel = columns[2]
    blocks = (numel + BLOCK - 1) // BLOCK
    total = int(blocks.sum())
    if total == 0:
        return None
    first = torch.cumsum(blocks, 0) - blocks
    block_tensor = torch.repeat_interleave(torch.arange(len(entries)), blocks)
    block_start = (torch.arange(total) - first[block_tensor]) * BLOCK
    columns = [block_tensor, block_start, *columns]
    # each table 16-byte aligned in the upload: Triton specializes pointers on it
    starts = [0]
    for col in columns:
        starts.append(starts[-1] + col.numel() + col.numel() % 2)
    packed = torch.zeros(starts[-1], dtype=torch.int64)
    for col, at in zip(columns, starts, strict=False):
        packed[at : at + col.numel()] = col
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    tables = tuple(packed[at : at + col.numel()] for col, at in zip(columns, starts, strict=False))
    return _Plan(tables, (total,))


def _readable(t: torch.Tensor, device: torch.device, dtype: torch.dtype, base: int) -> bool:
    """Whether a kernel can read `t` as 16-byte vectors from `base` (the device's memory, or
    pinned host memory over unified addressing)."""
    return (
        HAVE_TRITON
        and (t.device == device or t.is_pinned())
        and t.dtype == dtype
        and t.is_contiguous()
        and (t.data_ptr() - base) % VECTOR_BYTES == 0
    )


class GatherCopy:
    """Copies `srcs` into `dsts` (views of `arena`) with one launch; a plan made once.

    With `flag` (a device int32 its owner zeroes), the same pass also sets it when a source
    holds NaN, or inf where `strict`; `flagged[i]` says whether pair i was checked so. Pairs
    the kernel cannot take (misaligned; odd sizes, without a flag) go through
    `_foreach_copy_`.
    """

    def __init__(
        self,
        arena: torch.Tensor,
        dsts: list[torch.Tensor],
        srcs: list[torch.Tensor],
        flag: torch.Tensor | None = None,
        strict: Sequence[bool] = (),
    ) -> None:
        self.arena, self.flag = arena, flag
        item = arena.element_size()
        vec = max(1, VECTOR_BYTES // item)
        self.vec = vec
        assert flag is None or (arena.dtype in FLOAT_BITS and len(strict) == len(dsts))
        fast: list[tuple[int, int, int, bool]] = []
        self.flagged: list[bool] = []
        self.rest: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        base = arena.data_ptr()
        for i, (dst, src) in enumerate(zip(dsts, srcs, strict=True)):
            ok = (
                _readable(src, arena.device, arena.dtype, base)
                and dst.is_contiguous()
                and (dst.data_ptr() - base) % VECTOR_BYTES == 0
                and (flag is not None or src.numel() % vec == 0)
            )
            self.flagged.append(ok and flag is not None)
            if ok:
                fast.append(
                    (
                        (src.data_ptr() - base) // item,
                        (dst.data_ptr() - base) // item,
                        src.numel(),
                        flag is not None and strict[i],
                    )
                )
            else:
                self.rest[0].append(dst)
                self.rest[1].append(src)
        self.plan = _plan(fast, arena.device) if fast else None

    def __call__(self) -> None:
        plan = self.plan
        if plan is not None and self.flag is None:
            _gather_copy[plan.grid](
                self.arena, *plan.tables[:5], BLOCK=BLOCK, VEC=self.vec, num_warps=8
            )
        elif plan is not None:
            bits, exp, mant = FLOAT_BITS[self.arena.dtype]
            _gather_check[plan.grid](
                self.arena,
                *plan.tables,
                self.flag,
                BLOCK=BLOCK,
                VEC=self.vec,
                COPY=True,
                BITS=bits,
                EXP=exp,
                MANT=mant,
                num_warps=8,
            )
        if self.rest[0]:
            torch._foreach_copy_(*self.rest)


class FiniteCheck:
    """Sets `flag` (a device int32 its owner zeroes) when one of `tensors` holds NaN, or inf
    where `strict`: read-only, one launch per dtype, made once, then capturable.

    `rest` lists the indices of tensors it cannot read (odd layouts, other dtypes, pageable
    host memory): the caller checks those its own way.
    """

    def __init__(
        self, tensors: Sequence[torch.Tensor], strict: Sequence[bool], flag: torch.Tensor
    ) -> None:
        self.flag, self.tensors = flag, list(tensors)  # its tables point into their memory
        self.rest: list[int] = []
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(self.tensors):
            if t.dtype in FLOAT_BITS and _readable(t, flag.device, t.dtype, 0):
                groups.setdefault(t.dtype, []).append(i)
            else:
                self.rest.append(i)
        self.launches: list[tuple[torch.Tensor, _Plan]] = []
        for dtype, members in groups.items():
            item = self.tensors[members[0]].element_size()
            # an aligned base pointer of the dtype; every offset counts from it
            anchor = torch.empty(VECTOR_BYTES // item, dtype=dtype, device=flag.device)
            base = anchor.data_ptr()
            entries = [
                ((self.tensors[i].data_ptr() - base) // item, 0, self.tensors[i].numel(), strict[i])
                for i in members
            ]
            plan = _plan(entries, flag.device)
            if plan is not None:
                self.launches.append((anchor, plan))

    def __call__(self) -> None:
        for anchor, plan in self.launches:
            bits, exp, mant = FLOAT_BITS[anchor.dtype]
            _gather_check[plan.grid](
                anchor,
                *plan.tables,
                self.flag,
                BLOCK=BLOCK,
                VEC=VECTOR_BYTES // anchor.element_size(),
                COPY=False,
                BITS=bits,
                EXP=exp,
                MANT=mant,
                num_warps=8,
            )


def gather_copy_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to use the kernel: Triton present, not switched off, and its self-test passed."""
    if (
        not HAVE_TRITON
        or device.type != "cuda"
        or os.environ.get("TORCHREFIT_GATHER_COPY", "1") == "0"
    ):
        return False
    return _self_test(device, dtype)


def finite_kernels_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to check `dtype` values with the kernels (`FiniteCheck`, a flagged
    `GatherCopy`): Triton present, a dtype they read, not switched off
    (`TORCHREFIT_FINITE_KERNEL=0`), and their self-test passed."""
    if (
        not HAVE_TRITON
        or device.type != "cuda"
        or dtype not in FLOAT_BITS
        or os.environ.get("TORCHREFIT_FINITE_KERNEL", "1") == "0"
    ):
        return False
    return _finite_self_test(device, dtype)


@functools.cache
def _self_test(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the kernel once on scratch tensors and compare: a broken Triton falls back."""
    try:
        arena = torch.zeros(3 * BLOCK + 4096, dtype=dtype, device=device)
        srcs = [torch.randn(n, device=device).to(dtype) for n in (BLOCK + 64, 8)]
        srcs.append(torch.randn(2 * BLOCK - 8).to(dtype).pin_memory())  # read over UVA
        starts = [0, BLOCK + 512, BLOCK + 1024]
        dsts = [arena[s : s + t.numel()] for s, t in zip(starts, srcs, strict=True)]
        GatherCopy(arena, dsts, srcs)()
        return all(torch.equal(d, s.to(device)) for d, s in zip(dsts, srcs, strict=True))
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        logger.warning("the gather-copy kernel failed (%s); refits use _foreach_copy_", exc)
        return False


@functools.cache
def _finite_self_test(device: torch.device, dtype: torch.dtype) -> bool:
    """Both check kernels on scratch tensors, clean and then holding a refused value (in an
    odd tail, in pinned host memory, NaN where inf is allowed) or an allowed inf; a broken
    Triton falls back to torch reductions."""
    try:
        return _finite_trials(device, dtype)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        logger.warning("the finiteness kernels failed (%s); refits check with torch", exc)
        return False


def _finite_trials(device: torch.device, dtype: torch.dtype) -> bool:
    srcs = [torch.randn(n, device=device).to(dtype) for n in (BLOCK + 3, 1, 2 * BLOCK)]
    srcs.append(torch.randn(BLOCK - 5).to(dtype).pin_memory())  # read over UVA
    strict = [True, True, False, True]
    arena = torch.zeros(4 * BLOCK + 4096, dtype=dtype, device=device)
    dsts = [arena[s : s + t.numel()] for s, t in zip((0, 9000, 9216, 26624), srcs, strict=True)]
    flag = torch.zeros(1, dtype=torch.int32, device=device)

    def flags() -> tuple[int, int]:
        flag.zero_()
        check = FiniteCheck(srcs, strict, flag)
        check()
        checked = int(flag.item())
        flag.zero_()
        copy = GatherCopy(arena, dsts, srcs, flag, strict)
        copy()
        copied = int(flag.item())
        assert not check.rest and all(copy.flagged), "the self-test's tensors took another path"
        return checked, copied

    results = [flags() == (0, 0)]
    results.append(all(torch.equal(d, s.to(device)) for d, s in zip(dsts, srcs, strict=True)))
    for t, at, value, expected in (
        (2, -1, float("-inf"), (0, 0)),  # allowed there
        (0, -1, float("inf"), (1, 1)),  # in an odd tensor's last block
        (3, BLOCK // 2, float("nan"), (1, 1)),  # in pinned host memory
        (2, 0, float("nan"), (1, 1)),  # NaN, where inf is allowed
    ):
        keep = srcs[t][at].clone()
        srcs[t][at] = value
        results.append(flags() == expected)
        srcs[t][at] = keep
    return all(results)
