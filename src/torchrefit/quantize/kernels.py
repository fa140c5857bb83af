"""Triton kernels of quantized engines: re-quantizing weights in one pass, and products with
1-byte weights.

`quantize_rows`: one program per row reads the row once (held in registers), takes its
absolute maximum and writes the row's scale and quantized values: the definition's
arithmetic exactly (the same divisions, correctly rounded; round half to even), so the
result is bit-identical to the definition computed by PyTorch on the same device. One
detail of that device: CUDA PyTorch divides by a Python scalar as a product with its
reciprocal (`amax / 448.0` is `amax * (1 / 448.0)`), the CPU divides; the kernel does what
the device's eager code does.

`quant_mm`: x (M, K) in bf16 or fp16 times 1-byte weights q (N, K) upcast in registers
(exact: e4m3 and |int8| <= 127 are exact in bf16), each output column scaled after the
dot. The engines call it for products of more than one row on CUDA.

Only CUDA uses them (each after a self-test against the definition); the CPU wheel has no
Triton, and with Triton installed, `TRITON_INTERPRET=1` runs them on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .definition import dequantize, reference

logger = logging.getLogger("torchrefit")

MAX_ROW = 16384  # longer rows take the op-by-op definition
MAGIC = 12582912.0  # 1.5 * 2**23: (y + MAGIC) - MAGIC rounds |y| < 2**22 half to even

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _e4m3_bits(y):
        # float32 -> float8_e4m3fn bits, rounding half to even, as torch converts (Triton's
        # own conversion saturates, and its interpreter does not round to even)
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        a = mag.to(tl.float32, bitcast=True)
        subnormal = ((a * 512.0 + MAGIC) - MAGIC).to(tl.int32)  # steps of 2**-9 below 2**-6
        normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)  # exponent bias 7
        code = tl.where(a < 0.015625, subnormal, normal)
        code = tl.where(a != a, 0x7F, tl.minimum(code, 0x7F))  # NaN (e4m3fn has no inf)
        return (code | sign).to(tl.uint8)

    @triton.jit
    def _quantize_rows(
        w,
        q,
        s,
        cols,
        inv_top,
        top,
        BLOCK: tl.constexpr,
        INT8: tl.constexpr,
        RECIPROCAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(w + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        nan = tl.max((x != x).to(tl.int32), axis=0)  # torch's amax propagates NaN
        amax = tl.where(nan > 0, float("nan"), amax)
        amax = tl.where(amax < 1e-12, 1e-12, amax)  # clamp(min=1e-12); NaN stays NaN
        if RECIPROCAL:
            scale = amax * inv_top
        else:
            scale = tl.math.div_rn(amax, top)
        y = tl.math.div_rn(x, scale)
        if INT8:
            y = (y + MAGIC) - MAGIC
            y = tl.minimum(tl.maximum(y, -127.0), 127.0)
            tl.store(q + row * cols + offs, y.to(tl.int8), mask=mask)
        else:
            tl.store(q + row * cols + offs, _e4m3_bits(y), mask=mask)
        tl.store(s + row, scale)

    @triton.jit
    def _quant_mm(
        x,
        q,
        s,
        bias,
        out,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        HAS_BIAS: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(
                x + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            b = tl.load(
                q + rn[None, :].to(tl.int64) * K + kk[:, None],
                mask=(rn[None, :] < N) & (kk[:, None] < K),
                other=0.0,
            )
            acc += tl.dot(a, b.to(a.dtype))
        acc = acc * tl.load(s + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out + rm[:, None].to(tl.int64) * N + rn[None, :],
            acc.to(out.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )

    # products of a few rows read little else than the weights: enough programs in flight
    # matter more than tile reuse; the autotuner picks per (N, K, row block), once
    _quant_mm_tuned = triton.autotune(
        configs=[
            triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
            for bn, bk, warps, stages in (
                (16, 256, 4, 4),
                (32, 256, 4, 4),
                (32, 128, 4, 5),
                (64, 128, 4, 4),
                (64, 256, 8, 3),
                (128, 128, 8, 3),
            )
        ],
        key=["N", "K", "BM"],
    )(_quant_mm)

    HAVE_TRITON = True
except ImportError:  # the CPU wheel has no Triton
    HAVE_TRITON = False


def _row_block(cols: int) -> int:
    return max(16, triton.next_power_of_2(cols))


def quantize_rows(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) of a contiguous 2-D weight, per row, in one launch (caller checks the layout)."""
    rows, cols = w.shape
    dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    top = 127.0 if fmt == "int8" else 448.0
    q = torch.empty((rows, cols), dtype=dtype, device=w.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=w.device)
    if rows == 0:
        return q, s
    block = _row_block(cols)
    # 1 / top in float32 (a correctly rounded division), for a device that multiplies by it
    inv_top = float(torch.tensor(1.0, dtype=torch.float32) / top)
    _quantize_rows[(rows,)](
        w,
        q if fmt == "int8" else q.view(torch.uint8),
        s,
        cols,
        inv_top,
        top,
        BLOCK=block,
        INT8=fmt == "int8",
        RECIPROCAL=divides_by_reciprocal(w.device),
        num_warps=8 if block >= 4096 else 4,
    )
    return q, s


@functools.cache
def divides_by_reciprocal(device: torch.device) -> bool:
    """Whether PyTorch on `device` divides a tensor by a Python float as a product with its
    reciprocal (CUDA does: `amax / 448.0` is `amax * (1 / 448.0)`), asked of the device."""
    if device.type == "cpu":
        return False
    values = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 1e3
    inverse = torch.tensor(1.0) / 448.0
    on_device = (values.to(device) / 448.0).cpu()
    return bool(torch.equal(on_device, values * inverse)) and not torch.equal(
        on_device, values / 448.0
    )


def _row_block_of(m: int) -> int:
    """Rows of x per program: at least 16 (the dot's minimum)."""
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


def _mm_blocks(m: int, n: int) -> tuple[int, int]:
    """Tile sizes without the autotuner (Triton's interpreter): columns as wide as still
    gives about two programs per multiprocessor of an H100."""
    bm = _row_block_of(m)
    tiles_m = -(-m // bm)
    bn = 128
    while bn > 16 and tiles_m * -(-n // bn) < 264:
        bn //= 2
    return bm, bn


def quant_mm(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    args = (x, q, s, bias if bias is not None else s, out, m, n, k, x.stride(0), x.stride(1))
    if x.is_cuda:
        bm = _row_block_of(m)
        tiles = lambda meta: (triton.cdiv(m, bm), triton.cdiv(n, meta["BN"]))  # noqa: E731
        _quant_mm_tuned[tiles](*args, HAS_BIAS=bias is not None, BM=bm)
        return out
    bm, bn = _mm_blocks(m, n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _quant_mm[grid](*args, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=128, num_warps=4)
    return out


def _enabled() -> bool:
    return HAVE_TRITON and os.environ.get("TORCHREFIT_QUANT_KERNELS", "1") != "0"


def quantize_kernel_works(w: torch.Tensor) -> bool:
    """Whether `quantize_weight` of `w` takes the kernel: a contiguous 2-D floating CUDA
    tensor of rows up to MAX_ROW, and the kernel's self-test on that device passed."""
    return (
        _enabled()
        and w.is_cuda
        and w.dim() == 2
        and w.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and w.is_contiguous()
        and 0 < w.shape[1] <= MAX_ROW
        and _quantize_self_test(w.device)
    )


def mm_kernel_works(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether `quant_mm` takes the kernel: CUDA, bf16 or fp16 activations, contiguous
    1-byte weights, and the self-test passed."""
    return (
        _enabled()
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and q.is_contiguous()
        and q.shape[1] >= 16
        and _mm_self_test(x.device)
    )


@functools.cache
def _quantize_self_test(device: torch.device) -> bool:
    """The kernel against the definition on scratch rows (zeros, NaN, odd lengths); a
    broken Triton falls back to the definition op by op."""
    try:
        ok = True
        for fmt in ("fp8", "int8"):
            for cols in (7, 2048, 5000):
                w = torch.randn(33, cols, device=device).to(torch.bfloat16) * 3
                w[1] = 0
                w[2, -1] = float("nan")
                q, s = quantize_rows(w, fmt)
                want_q, want_s = reference(w, fmt)
                ok &= bool(torch.equal(s.view(torch.int32), want_s.view(torch.int32)))
                ok &= bool(torch.equal(q.view(torch.uint8)[3:], want_q.view(torch.uint8)[3:]))
        return ok
    except Exception as exc:  # noqa: BLE001 - any failure means: use the definition
        logger.warning("the quantize kernel failed (%s); refits quantize op by op", exc)
        return False


@functools.cache
def _mm_self_test(device: torch.device) -> bool:
    try:
        ok = True
        for fmt in ("fp8", "int8"):
            for m, n, k in ((3, 40, 64), (33, 300, 200)):
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                q, s = reference(torch.randn(n, k, device=device), fmt)
                bias = torch.randn(n, device=device, dtype=torch.bfloat16)
                got = quant_mm(x, q, s, bias).float()
                want = torch.addmm(bias, x, dequantize(q, s, x.dtype).t()).float()
                ok &= bool(((got - want).norm() / want.norm()) < 2e-2)
        return ok
    except Exception as exc:  # noqa: BLE001 - any failure means: dequantize, then mm
        logger.warning("the quantized mm kernel failed (%s); engines dequantize, then mm", exc)
        return False
