"""What holds under threads: every call computes with one complete weight set, refits of one
module serialize, and first calls of a MutableModule from two threads trace once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import torchrefit

from cases import CASES
from helpers import assert_matches, run_eager

CALLS = 2000
SECONDS = 8.0


@pytest.fixture
def one_thread():
    """Bit-exact comparisons: one intra-op thread, so a weight set always gives one output."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _two_weight_sets():
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    return (
        case,
        a,
        b,
        {k: v.clone() for k, v in a.state_dict().items()},
        {k: v.clone() for k, v in b.state_dict().items()},
    )


def _outputs_of(compiled, weights_a, weights_b, x):
    torchrefit.refit_module_weights(compiled, weights_a, in_place=True)
    out_a = compiled(x)
    torchrefit.refit_module_weights(compiled, weights_b, in_place=True)
    out_b = compiled(x)
    assert not torch.equal(out_a, out_b)
    return out_a, out_b


def _hammer(call, refit, outputs) -> tuple[int, int]:
    """Calls from this thread while another refits continuously; (calls, torn calls)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def refitting() -> None:
        try:
            i = 0
            while not stop.is_set():
                refit(i % 2)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=refitting)
    worker.start()
    calls = torn = 0
    deadline = time.monotonic() + SECONDS
    try:
        while calls < CALLS and time.monotonic() < deadline:
            out = call()
            calls += 1
            torn += not any(torch.equal(out, o) for o in outputs)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    return calls, torn


@pytest.mark.parametrize(
    "backend,double_buffer",
    [
        ("eager", False),
        ("eager", True),
        pytest.param("inductor", False, marks=pytest.mark.inductor),
        pytest.param("inductor", True, marks=pytest.mark.inductor),
    ],
)
def test_calls_during_refits_see_one_complete_weight_set(
    one_thread, backend: str, double_buffer: bool
) -> None:
    case, a, _, weights_a, weights_b = _two_weight_sets()
    x = case.inputs()[0]
    compiled = torchrefit.compile(a, (x,), backend=backend, double_buffer=double_buffer)
    outputs = _outputs_of(compiled, weights_a, weights_b, x)
    sets = (weights_a, weights_b)
    calls, torn = _hammer(
        lambda: compiled(x),
        lambda i: torchrefit.refit_module_weights(compiled, sets[i], in_place=True),
        outputs,
    )
    assert calls >= 200
    assert torn == 0, f"{torn} of {calls} calls computed with a mix of weights"


def test_refitter_during_calls_sees_one_complete_weight_set(one_thread) -> None:
    case, a, b, _, _ = _two_weight_sets()
    x = case.inputs()[0]
    compiled = torchrefit.compile(a, (x,), backend="eager")
    out_a = compiled(x)
    refitters = (torchrefit.Refitter(compiled, a), torchrefit.Refitter(compiled, b))
    refitters[1]()
    out_b = compiled(x)
    calls, torn = _hammer(lambda: compiled(x), lambda i: refitters[i](), (out_a, out_b))
    assert torn == 0, f"{torn} of {calls} calls computed with a mix of weights"


def test_two_refitting_threads_leave_one_complete_weight_set(one_thread) -> None:
    case, a, _, weights_a, weights_b = _two_weight_sets()
    x = case.inputs()[0]
    for double_buffer in (False, True):
        compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
        out_a, out_b = _outputs_of(compiled, weights_a, weights_b, x)
        for _ in range(5):
            barrier = threading.Barrier(2)

            def refit(weights, barrier=barrier, compiled=compiled):
                barrier.wait()
                for _ in range(30):
                    torchrefit.refit_module_weights(compiled, weights, in_place=True)

            threads = [threading.Thread(target=refit, args=(w,)) for w in (weights_a, weights_b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out = compiled(x)
            assert torch.equal(out, out_a) or torch.equal(out, out_b), "refits interleaved"


def test_mutable_first_calls_from_two_threads_trace_once_and_leave_the_model_intact() -> None:
    case = CASES["mlp"]
    model = case.build(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = case.inputs()[0]
    barrier = threading.Barrier(2)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def first_call() -> None:
        try:
            barrier.wait()
            results.append(mutable(x))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert mutable.compiles == 1
    for name, value in model.state_dict().items():
        assert type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter), name
        assert torch.equal(value, before[name]), name
    for out in results:
        assert_matches(out, run_eager(model, x))


def test_a_refused_double_buffered_refit_never_flips() -> None:
    case, a, b, _, weights_b = _two_weight_sets()
    x = case.inputs()[0]
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=True)
    before = compiled(x)
    bad = dict(weights_b)
    bad["fc2.weight"] = bad["fc2.weight"].clone()
    bad["fc2.weight"][0, 0] = float("nan")
    with pytest.raises(torchrefit.WeightValueError, match="fc2.weight"):
        torchrefit.refit_module_weights(compiled, bad, in_place=True)
    assert torch.equal(compiled(x), before)
    torchrefit.refit_module_weights(compiled, weights_b, in_place=True)  # the standby recovers
    assert_matches(compiled(x), run_eager(b, x))


def test_double_buffered_partial_refits_keep_every_constant_current() -> None:
    """MutableModule refits only the constants whose weights changed: the standby must be
    brought up to date with the others before it becomes active."""
    case = CASES["mlp"]
    model = case.build(0)
    mutable = torchrefit.MutableModule(model, backend="eager", double_buffer=True)
    x = case.inputs()[0]
    assert_matches(mutable(x), run_eager(model, x))
    for name in ("fc1.weight", "fc3.bias", "fc2.weight", "fc1.bias"):
        with torch.no_grad():
            model.get_parameter(name).add_(0.5)
        assert_matches(mutable(x), run_eager(model, x))
    assert mutable.compiles == 1 and mutable.refits == 4


class MaskedScores(torch.nn.Module):
    """A -inf attention-style mask: inf a compiled constant held may stay; NaN never."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)
        mask = torch.zeros(6)
        mask[-2:] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x) + self.mask, dim=-1)


@pytest.mark.parametrize("double_buffer", [False, True])
def test_finiteness_nan_anywhere_and_new_inf_are_refused(double_buffer: bool) -> None:
    a, b = MaskedScores().eval(), MaskedScores().eval()
    x = torch.randn(3, 6)
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
    torchrefit.refit_module_weights(compiled, b, in_place=True)  # the mask's -inf is kept
    assert_matches(compiled(x), run_eager(b, x))
    before = compiled(x)
    for name, value in (
        ("proj.weight", float("nan")),
        ("proj.bias", float("inf")),
        ("mask", float("nan")),
    ):
        bad = {k: v.clone() for k, v in b.state_dict().items()}
        bad[name].view(-1)[0] = value
        with pytest.raises(torchrefit.WeightValueError, match=name.replace(".", r"\.")):
            torchrefit.refit_module_weights(compiled, bad, in_place=True)
        assert torch.equal(compiled(x), before)
