"""The finiteness check at memory speed: the check kernel and the flagged copy against
torch's isfinite, and every door refusing a NaN before it is served (plain: nothing
written; double-buffered: never flipped), naming the weight.

On CPU the check is torch reductions; tests marked `gpu` run the Triton kernels. With
Triton installed, the kernels' logic also runs on CPU tensors under Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable

import pytest
import torch

import torchrefit
from torchrefit.copy_kernel import (
    BLOCK,
    COPY_BITS,
    FLOAT_BITS,
    FiniteCheck,
    GatherCopy,
    _plan,
    finite_kernels_work,
)

from helpers import assert_matches, run_eager, run_interpreted
from models import odd_sized_with_mask

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SIZES = (1, 7, 8, 9, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 5)
NAN, INF = float("nan"), float("inf")


def kernel_trials(device: torch.device, dtype: torch.dtype, pinned: bool) -> int:
    """FiniteCheck and the flagged GatherCopy over tensors of many sizes, each value refused
    or allowed at a tensor's first, middle and last element, against torch's isfinite;
    every copy bitwise exact. `pinned`: every other source in pinned host memory."""
    gen = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(n, generator=gen) * 100).to(dtype) for n in SIZES]
    tensors = [t.pin_memory() if pinned and i % 2 else t.to(device) for i, t in enumerate(tensors)]
    slots = [-(-n // 128) * 128 for n in SIZES]
    arena = torch.zeros(sum(slots), dtype=dtype, device=device)
    starts = [sum(slots[:i]) for i in range(len(slots))]
    dsts = [arena[s : s + t.numel()] for s, t in zip(starts, tensors, strict=True)]
    flag = torch.zeros(1, dtype=torch.int32, device=device)

    def flags(strict: list[bool]) -> tuple[bool, bool]:
        flag.zero_()
        check = FiniteCheck(tensors, strict, flag)
        assert not check.rest
        check()
        checked = bool(flag.item())
        flag.zero_()
        copy = GatherCopy(arena, dsts, tensors, flag, strict)
        assert all(copy.flagged)
        copy()
        for d, s in zip(dsts, tensors, strict=True):
            assert torch.equal(d.cpu().view(torch.uint8), s.cpu().view(torch.uint8))
        return checked, bool(flag.item())

    assert flags([True] * len(SIZES)) == (False, False)
    trials = 0
    for i, n in enumerate(SIZES):
        for at in sorted({0, n // 2, n - 1}):
            for value in (NAN, INF, -INF):
                for allowed in (False, True):
                    strict = [j != i or not allowed for j in range(len(SIZES))]
                    keep = tensors[i][at].clone()
                    tensors[i][at] = value
                    t = tensors[i]
                    want = bool(torch.isnan(t).any()) or (
                        not allowed and not bool(torch.isfinite(t).all())
                    )
                    assert flags(strict) == (want, want), (dtype, n, at, value, allowed)
                    tensors[i][at] = keep
                    trials += 1
    return trials


# -- the kernels ----------------------------------------------------------------------------


def test_plan_tables_cover_every_element_once_and_start_aligned() -> None:
    entries = [(0, 0, 1, True), (100, 16, BLOCK, False), (-64, 9000, 2 * BLOCK + 5, True)]
    plan = _plan(entries, torch.device("cpu"))
    assert plan is not None and plan.grid == (1 + 1 + 3,)
    block_tensor, block_start, src, dst, numel, strict = plan.tables
    assert block_tensor.tolist() == [0, 1, 2, 2, 2]
    assert block_start.tolist() == [0, 0, 0, BLOCK, 2 * BLOCK]
    assert src.tolist() == [0, 100, -64] and dst.tolist() == [0, 16, 9000]
    assert numel.tolist() == [1, BLOCK, 2 * BLOCK + 5] and strict.tolist() == [1, 0, 1]
    assert all(t.data_ptr() % 16 == 0 for t in plan.tables)  # Triton specializes on it
    assert _plan([(0, 0, 0, True)], torch.device("cpu")) is None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_kernel_logic_under_the_triton_interpreter() -> None:
    """The kernel trials and the doors on CPU tensors, run by Triton's interpreter (no GPU
    needed)."""
    run_interpreted(
        "from test_finite_kernel import interpreted_doors, kernel_trials;"
        "[kernel_trials(torch.device('cpu'), d, False) for d in (torch.bfloat16, torch.float32)];"
        "interpreted_doors()",
        timeout=600,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pinned", [False, True])
def test_check_kernel_and_flagged_copy_agree_with_isfinite(
    dtype: torch.dtype, pinned: bool
) -> None:
    device = torch.device("cuda")
    assert finite_kernels_work(device, dtype)
    assert kernel_trials(device, dtype, pinned) > 100


@pytest.mark.gpu
def test_check_kernel_replays_in_a_cuda_graph() -> None:
    """Captured once, the check reads the tensors' current values on each replay."""
    tensors = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (5, BLOCK + 1)]
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    check = FiniteCheck(tensors, [True, True], flag)
    assert not check.rest
    check()  # compiles outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flag.zero_()
        check()
    for value, refused in ((0.0, 0), (NAN, 1), (0.0, 0), (-INF, 1)):
        tensors[1][-1] = value
        graph.replay()
        assert flag.item() == refused, value


class MixedSources(torch.nn.Module):
    """Constants of four dtypes and a mask that holds -inf as compiled."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(4096, dtype=torch.bfloat16))
        self.t = torch.nn.Parameter(torch.randn(33, 64, dtype=torch.float16))
        self.d = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
        self.h = torch.nn.Parameter(torch.randn(31))
        self.register_buffer("mask", torch.full((9,), -INF))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.a.float().sum() + self.t.float().sum() + self.d.float().sum()
        return x + self.mask + total + self.h.sum()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_values_the_kernel_cannot_read_in_place_are_refused_too(device: str) -> None:
    """A misaligned view, a transposed tensor, float64 and a pageable host tensor: staged
    or checked by torch; a NaN (or a new inf) in any is refused and nothing is written."""
    model = MixedSources().to(device)
    compiled = torchrefit.compile(model, (torch.randn(9, device=device),), backend="eager")
    base = torch.randn(4097, device=device, dtype=torch.bfloat16)
    sources = {
        "a": base[1:],  # misaligned
        "t": torch.randn(64, 33, device=device, dtype=torch.float16).t(),  # transposed
        "d": torch.randn(50, device=device, dtype=torch.float64),
        "h": torch.randn(31),  # pageable host memory
        "mask": torch.full((9,), -INF, device=device),
    }
    torchrefit.refit_module_weights(compiled, sources, in_place=True)
    before = {k: v.clone() for k, v in compiled._torchrefit.store.tensors.items()}
    for name, value in [(k, NAN) for k in sources] + [(k, INF) for k in sources if k != "mask"]:
        flat = sources[name]
        at = (-1,) if flat.dim() == 1 else (-1, -1)
        keep = flat[at].clone()
        flat[at] = value
        with pytest.raises(torchrefit.WeightValueError, match=repr(name)):
            torchrefit.refit_module_weights(compiled, sources, in_place=True)
        flat[at] = keep
        for key, held in compiled._torchrefit.store.tensors.items():
            assert torch.equal(held, before[key]), (name, value, key)


# -- the doors ------------------------------------------------------------------------------

REFUSED = (
    ("fc2.bias", -1, NAN),  # the last element of an odd-sized tensor
    ("fc1.weight", 0, -INF),  # the first element; -inf where the constant held none
    ("fc1.weight", 4808, NAN),  # the middle of a tensor larger than a block
    ("mask", 0, NAN),  # NaN, where inf is allowed
)


def _model_pair(device: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = odd_sized_with_mask(0).to(device, dtype)
    b = odd_sized_with_mask(1).to(device, dtype)
    return a, b, torch.randn(3, 16, device=device, dtype=dtype)


def _refuses_each_value(
    refit: Callable[[], None],
    compiled: torchrefit.CompiledModule,
    b: torch.nn.Module,
    x: torch.Tensor,
) -> None:
    """Each refused value raises naming its weight and leaves the outputs as they were; an
    inf in the mask passes; finite weights then refit to eager's outputs."""
    refit()
    assert_matches(compiled(x), run_eager(b, x))
    before = compiled(x)
    weights = b.state_dict()
    for name, at, value in REFUSED:
        flat = weights[name].view(-1)
        keep = flat[at].clone()
        flat[at] = value
        with pytest.raises(torchrefit.WeightValueError, match=re.escape(repr(name))):
            refit()
        flat[at] = keep
        assert torch.equal(compiled(x), before), name
    mask = weights["mask"].view(-1)
    mask[0] = INF  # the mask held inf when compiled: inf may stay
    refit()
    mask[0] = 0.0
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-0.5)
    refit()
    assert_matches(compiled(x), run_eager(b, x))


DOORS = ("refitter", "refitter_without_graphs", "refit_module_weights", "pinned_host")


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("double_buffer", [False, True])
@pytest.mark.parametrize("door", DOORS)
def test_every_door_refuses_non_finite_values_naming_the_weight(
    device: str, double_buffer: bool, door: str
) -> None:
    if door == "pinned_host" and device != "cuda":
        pytest.skip("pinned memory needs CUDA")
    door_trial(device, double_buffer, door)


def door_trial(device: str, double_buffer: bool, door: str) -> None:
    a, b, x = _model_pair(device)
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
    refit: Callable[[], None]
    if door.startswith("refitter"):
        refit = torchrefit.Refitter(compiled, b, cuda_graph=door == "refitter")
    elif door == "pinned_host":
        refit = lambda: torchrefit.refit_module_weights(  # noqa: E731
            compiled, {k: v.cpu().pin_memory() for k, v in b.state_dict().items()}, in_place=True
        )
    else:
        refit = lambda: torchrefit.refit_module_weights(compiled, b, in_place=True)  # noqa: E731
    _refuses_each_value(refit, compiled, b, x)


def interpreted_doors() -> None:
    """The doors on CPU with the kernels switched on there (Triton's interpreter runs them):
    every value goes through a kernel, none through torch's reductions."""
    import torchrefit.refit.evaluate as evaluate_stage
    import torchrefit.refit.transfer as transfer_stage

    transfer_stage.use_kernels = lambda device: True
    transfer_stage.finite_kernels_work = lambda device, dtype: dtype in FLOAT_BITS
    transfer_stage.gather_copy_works = lambda device, dtype: dtype in COPY_BITS
    evaluate_stage.finite_kernels_work = transfer_stage.finite_kernels_work
    torch_check = transfer_stage.refused_on_cpu

    def no_torch_reads(tensors: dict[str, torch.Tensor], *args: object) -> bool:
        floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
        assert not floating, f"read by torch: {sorted(floating)}"
        return torch_check(tensors, *args)

    transfer_stage.refused_on_cpu = no_torch_reads
    for double_buffer in (False, True):
        for door in ("refitter_without_graphs", "refit_module_weights"):
            door_trial("cpu", double_buffer, door)


@pytest.mark.gpu
@pytest.mark.parametrize("double_buffer", [False, True])
def test_refitter_graphs_check_with_the_kernels(double_buffer: bool) -> None:
    """Plain: a captured check graph before the copy; double-buffered: no check graph, and
    the captured copy into each bank flags every constant (nothing is read twice)."""
    a, b, x = _model_pair("cuda")
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
    refitter = torchrefit.Refitter(compiled, b)
    graphs = refitter._graphs
    assert graphs is not None
    for _ in range(3):  # both banks of a double buffer
        refitter()
    assert (graphs.check is None) == double_buffer
    floating = {k for k, v in compiled._torchrefit.store.tensors.items() if v.is_floating_point()}
    for plan, _ in graphs.copies.values():
        if double_buffer:
            assert plan.flagged is not None and plan.flagged.keys == floating
        else:
            assert plan.flagged is None
    assert len(graphs.copies) == (2 if double_buffer else 1)
    assert_matches(compiled(x), run_eager(b, x))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_double_buffered_module_refitted_into_a_copy_is_checked_too(device: str) -> None:
    """`in_place=False` writes a new store, not a standby: its values are checked all the
    same (validate leaves a double-buffered module's check to the written copy)."""
    a, b, x = _model_pair(device)
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=True)
    bad = {k: v.clone() for k, v in b.state_dict().items()}
    bad["fc2.weight"].view(-1)[-1] = NAN
    with pytest.raises(torchrefit.WeightValueError, match="fc2.weight"):
        torchrefit.refit_module_weights(compiled, bad)
    copy = torchrefit.refit_module_weights(compiled, b)
    assert_matches(copy(x), run_eager(b, x))
