"""The commit's write on CUDA: every kind of source read once into the engines, checked on
the device, the copy into a live store gated by the check (no host sync between them).
Each test compares with eager PyTorch on fresh inputs, and a refused refit must leave the
module computing exactly what it did."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchrefit
import torchrefit.refit.transfer as transfer

from cases import CASES
from helpers import assert_matches, run_eager

pytestmark = pytest.mark.gpu
NAN = float("nan")


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


class Mixed(nn.Module):
    """Float16 weights of odd and even sizes, an int64 buffer, an attention-like -inf mask."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(96, 70)
        self.b = nn.Linear(70, 33)
        self.register_buffer("steps", torch.tensor([seed + 3], dtype=torch.int64))
        mask = torch.zeros(33)
        mask[::5] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x))) + self.mask.to(x.dtype)
        return y.softmax(-1) * self.steps.to(x.dtype)


def _sources(model: nn.Module, kind: str, tmp_path) -> object:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if kind == "device":
        return {k: v.cuda().clone() for k, v in state.items()}
    if kind == "device_strided":  # every float weight a transposed view, misaligned too
        out = {}
        for k, v in state.items():
            v = v.cuda()
            if v.dim() == 2:
                out[k] = v.t().contiguous().t()
            elif v.is_floating_point():
                out[k] = torch.cat([torch.zeros(1, dtype=v.dtype, device="cuda"), v])[1:]
            else:
                out[k] = v.clone()
        return out
    if kind == "pinned":
        return {k: v.cpu().pin_memory() for k, v in state.items()}
    if kind == "pageable":
        return {k: v.cpu().clone() for k, v in state.items()}
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.cpu().contiguous() for k, v in state.items()}, path)
    return path


def _poison(source: object, tmp_path, key: str) -> object:
    if isinstance(source, str):
        from safetensors.torch import load_file

        state = load_file(source)
        state[key] = state[key].clone()
        state[key].view(-1)[-1] = NAN
        path = str(tmp_path / "bad.safetensors")
        save_file(state, path)
        return path
    bad = dict(source)  # type: ignore[call-overload]
    value = bad[key].clone()
    value.view(-1)[-1] = NAN
    bad[key] = value.pin_memory() if bad[key].is_pinned() else value
    return bad


KINDS = ["device", "device_strided", "pinned", "pageable", "file"]


@pytest.mark.parametrize("double_buffer", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_every_source_refits_and_a_nan_in_it_changes_nothing(
    tmp_path, kind: str, double_buffer: bool
) -> None:
    a, b = Mixed(0).cuda().half().eval(), Mixed(1).cuda().half().eval()
    x = torch.randn(5, 96, device="cuda", dtype=torch.float16)
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
    source = _sources(b, kind, tmp_path)
    torchrefit.refit_module_weights(compiled, source, in_place=True)
    y = torch.randn(5, 96, device="cuda", dtype=torch.float16)
    assert_matches(compiled(y), run_eager(b, y))
    before = compiled(y)
    for key in ("a.weight", "b.bias"):
        with pytest.raises(torchrefit.WeightValueError, match=key.replace(".", r"\.")):
            torchrefit.refit_module_weights(compiled, _poison(source, tmp_path, key), in_place=True)
        assert torch.equal(compiled(y), before)
    copy = torchrefit.refit_module_weights(compiled, _sources(a, kind, tmp_path))
    assert_matches(copy(y), run_eager(a, y))
    assert torch.equal(compiled(y), before)


@pytest.mark.parametrize("kind", ["pinned", "pageable", "file", "device_strided"])
def test_sources_larger_than_the_staging_area_go_in_two_passes(tmp_path, kind: str) -> None:
    width = 1024  # 4 MB float32 weights against a 1 MB staging area
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 8)).cuda().eval()
    b = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 8)).cuda().eval()
    x = torch.randn(3, width, device="cuda")
    compiled = torchrefit.compile(a, (x,), backend="eager", staging_bytes=1 << 20)
    torchrefit.refit_module_weights(compiled, _sources(b, kind, tmp_path), in_place=True)
    assert_matches(compiled(x), run_eager(b, x))
    before = compiled(x)
    bad = _poison(_sources(a, kind, tmp_path), tmp_path, "0.weight")
    with pytest.raises(torchrefit.WeightValueError, match=r"0\.weight"):
        torchrefit.refit_module_weights(compiled, bad, in_place=True)
    assert torch.equal(compiled(x), before)


def test_a_source_changed_between_the_passes_leaves_weights_unset(tmp_path, monkeypatch) -> None:
    width = 1024
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 8)).cuda().eval()
    b = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 8)).cuda().eval()
    x = torch.randn(3, width, device="cuda")
    compiled = torchrefit.compile(a, (x,), backend="eager", staging_bytes=1 << 20)
    pinned = _sources(b, "pinned", tmp_path)
    second = transfer.Transfer._second_pass

    def poison_then_second_pass(self) -> None:
        pinned["1.weight"].view(-1)[-1] = NAN  # type: ignore[index]
        second(self)

    monkeypatch.setattr(transfer.Transfer, "_second_pass", poison_then_second_pass)
    with pytest.raises(torchrefit.WeightValueError, match="unset"):
        torchrefit.refit_module_weights(compiled, pinned, in_place=True)
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        compiled(x)
    monkeypatch.undo()
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))


@pytest.mark.parametrize("double_buffer", [False, True])
@pytest.mark.parametrize("kind", ["device", "pinned"])
@pytest.mark.parametrize("name", ["mlp", "conv_bn_folded"])
def test_refitter_graphs_refit_and_refuse(kind: str, double_buffer: bool, name: str) -> None:
    """One captured graph per bank: the weight program (a folded batch norm), the check,
    the gated or flagged copy; a NaN is refused by name and nothing changes."""
    case = CASES[name]
    a, b = case.build(0).cuda().half(), case.build(1).cuda().half()
    x = tuple(t.cuda().half() if t.is_floating_point() else t.cuda() for t in case.inputs())
    compiled = torchrefit.compile(
        a, x, backend="eager", double_buffer=double_buffer, **case.settings
    )
    weights = (
        dict(b.state_dict())
        if kind == "device"
        else {k: v.cpu().pin_memory() for k, v in b.state_dict().items()}
    )
    refitter = torchrefit.Refitter(compiled, weights)
    assert refitter._graphs is not None
    for _ in range(3):  # both banks, replayed
        refitter()
        assert_matches(compiled(*x), run_eager(b, *x))
    assert all(bank.graph is not None for bank in refitter._graphs.banks.values())
    before = compiled(*x)
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() > 1)
    keep = weights[key].clone()
    weights[key].view(-1)[0] = NAN
    with pytest.raises(torchrefit.WeightValueError):
        refitter()
    assert torch.equal(compiled(*x), before)
    weights[key].copy_(keep)
    with torch.no_grad():
        for v in weights.values():
            if v.is_floating_point():
                v.mul_(0.5)
    refitter()
    reference = case.build(1).cuda().half()
    reference.load_state_dict({k: v.cuda() for k, v in weights.items()})
    assert_matches(compiled(*x), run_eager(reference, *x))


def test_complex_weights_go_through_torch_on_cuda_and_are_checked() -> None:
    class ComplexWeight(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.z = nn.Parameter(torch.randn(8, dtype=torch.complex64))
            self.w = nn.Parameter(torch.randn(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.z).abs() + self.w

    a, b = ComplexWeight(0).cuda().eval(), ComplexWeight(1).cuda().eval()
    x = torch.randn(3, 8, dtype=torch.complex64, device="cuda")
    compiled = torchrefit.compile(a, (x,), backend="eager")
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))
    before = compiled(x)
    bad = {k: v.detach().clone() for k, v in b.state_dict().items()}
    bad["w"][2] = NAN  # the kernel's flag must stop the torch copy of z too
    with pytest.raises(torchrefit.WeightValueError, match="'w'"):
        torchrefit.refit_module_weights(compiled, bad, in_place=True)
    assert torch.equal(compiled(x), before)


def test_a_refitter_casting_its_weights_follows_every_step() -> None:
    """float32 trainer weights into a bfloat16 engine: the cast is part of the captured
    evaluate stage, so each call reads the trainer's current values."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).cuda().eval()
    trainer = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).cuda().eval()
    x = torch.randn(4, 64, device="cuda")
    compiled = torchrefit.compile(a, (x,), backend="eager", dtype="bfloat16")
    refitter = torchrefit.Refitter(compiled, trainer)
    for _ in range(3):
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(torch.randn_like(p))
        refitter()
        reference = trainer.to(torch.bfloat16)
        assert_matches(compiled(x), run_eager(reference, x.bfloat16()))
        trainer.float()


def test_calls_from_two_threads_share_the_graph_buffers_in_turn() -> None:
    import threading

    case = CASES["mlp"]
    a = case.build(0).cuda().half()
    x = tuple(t.cuda().half() for t in case.inputs())
    compiled = torchrefit.compile(a, x, cuda_graphs=True)
    inputs = [tuple(torch.randn_like(t) for t in x) for _ in range(2)]
    expected = [run_eager(a, *y) for y in inputs]
    wrong: list[int] = []

    def calling(i: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(300):
                out = compiled(*inputs[i])
                if not torch.equal(out, compiled(*inputs[i])):
                    wrong.append(i)
                torch.cuda.current_stream().synchronize()
                if (out - expected[i]).abs().max() > 0.05:
                    wrong.append(i)

    threads = [threading.Thread(target=calling, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_unchecked_refits_from_two_streams_leave_one_weight_set() -> None:
    import threading

    case = CASES["mlp"]
    a, b = case.build(0).cuda().half(), case.build(1).cuda().half()
    x = tuple(t.cuda().half() for t in case.inputs())
    compiled = torchrefit.compile(a, x, check_finite=False)
    sources = (dict(a.state_dict()), dict(b.state_dict()))

    def refitting(i: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(100):
                torchrefit.refit_module_weights(compiled, sources[i], in_place=True)

    threads = [threading.Thread(target=refitting, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    out = compiled(*x)
    assert (
        torch.equal(out, run_eager(a, *x))
        or torch.equal(out, run_eager(b, *x))
        or any(float((out - run_eager(m, *x)).abs().max()) < 1e-2 for m in (a, b))
    )
