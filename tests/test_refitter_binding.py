"""A bound Refitter: O(1) host work per call whatever the weight count, and every change
of what it bound refused (issue 16 item 4: a replaced parameter object kept serving the old
weights; issue 17: the per-call check of bound tensors was a Python loop over them)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

import torchrefit

from helpers import assert_matches, run_eager


def _stack(layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)]).eval()


def _python_calls(fn: Callable[[], None]) -> int:
    """Python-level work of one call: function calls and C calls made from Python."""
    count = [0]

    def profile(frame, event, arg) -> None:  # noqa: ANN001 - sys.setprofile's signature
        if event in ("call", "c_call"):
            count[0] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0]


def test_a_refitter_call_does_python_work_independent_of_the_weight_count() -> None:
    counts = {}
    for layers in (4, 64):
        a, b = _stack(layers, 0), _stack(layers, 1)
        x = torch.randn(2, 16)
        compiled = torchrefit.compile(a, (x,), backend="eager")
        refitter = torchrefit.Refitter(compiled, b)
        refitter()
        refitter()  # warm
        counts[layers] = _python_calls(refitter)
        assert_matches(compiled(x), run_eager(b, x))
    assert counts[64] == counts[4], counts


@pytest.mark.parametrize("how", ["setattr", "load_state_dict_assign", "register_parameter"])
def test_a_replaced_parameter_object_is_refused(how: str) -> None:
    a, b = _stack(3, 0), _stack(3, 1)
    x = torch.randn(2, 16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, b)
    refitter()
    before = compiled(x)
    new = nn.Parameter(torch.randn(16, 16))
    if how == "setattr":
        b[1].weight = new
    elif how == "load_state_dict_assign":
        state = {k: v.clone() for k, v in b.state_dict().items()}
        b.load_state_dict(state, assign=True)
    else:
        b[1].register_parameter("weight", new)
    with pytest.raises(torchrefit.TorchRefitError, match=r"replaced by another tensor object"):
        refitter()
    assert torch.equal(compiled(x), before)
    torchrefit.Refitter(compiled, b)()  # a new Refitter binds the new objects
    assert_matches(compiled(x), run_eager(b, x))


def test_unrelated_registrations_do_not_disturb_a_refitter() -> None:
    a, b = _stack(3, 0), _stack(3, 1)
    x = torch.randn(2, 16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, b)
    nn.Linear(4, 4)  # registers parameters of another module
    with torch.no_grad():
        b[0].weight.mul_(2.0)
    refitter()
    assert_matches(compiled(x), run_eager(b, x))


def test_a_moved_data_and_a_changed_dtype_are_refused_by_name() -> None:
    a, b = _stack(3, 0), _stack(3, 1)
    x = torch.randn(2, 16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, b)
    b[2].bias.data = torch.randn(16)
    with pytest.raises(torchrefit.TorchRefitError, match=r"'2\.bias'.*other memory"):
        refitter()
    refitter = torchrefit.Refitter(compiled, b)
    b[0].weight.data = b[0].weight.data.double()
    with pytest.raises(torchrefit.WeightDtypeError, match=r"'0\.weight'.*float64"):
        refitter()


def test_a_state_dict_refitter_binds_its_tensors_and_takes_a_name_map() -> None:
    a, b = _stack(3, 0), _stack(3, 1)
    x = torch.randn(2, 16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    prefixed = {f"module.{k}": v for k, v in b.state_dict().items()}
    refitter = torchrefit.Refitter(compiled, prefixed, name_map=lambda n: n.removeprefix("module."))
    refitter()
    assert_matches(compiled(x), run_eager(b, x))
    with torch.no_grad():
        prefixed["module.1.weight"].mul_(-1.0)
    refitter()
    assert_matches(compiled(x), run_eager(b, x))


def test_a_replaced_module_above_a_bound_weight_is_refused() -> None:
    a, b = _stack(3, 0), _stack(3, 1)
    x = torch.randn(2, 16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, b)
    b[1] = nn.Linear(16, 16)  # the Linear holding '1.weight' and '1.bias' is another one
    with pytest.raises(torchrefit.TorchRefitError, match=r"'1\.(weight|bias)'.*replaced"):
        refitter()


def test_a_replacement_seen_before_it_lands_is_still_refused() -> None:
    """torch's hooks run before the assignment lands: a refit between the two must not
    take the old object for the bound one and forget the replacement."""
    a, b = _stack(3, 0), _stack(3, 1)
    x = torch.randn(2, 16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, b)
    during: list[Exception] = []

    def refit_meanwhile(module, name, value) -> None:
        try:
            refitter()
        except torchrefit.TorchRefitError as exc:
            during.append(exc)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(refit_meanwhile)
    try:
        b[2].weight = nn.Parameter(torch.randn(16, 16))
    finally:
        handle.remove()
    with pytest.raises(torchrefit.TorchRefitError, match="replaced"):
        refitter()
