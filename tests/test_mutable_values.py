"""MutableModule never stale, never poisoned: refused values raise (issue 16, item 2), an
update that lands during a refit is seen by the next call (item 3), and `.data` writes are
seen where they happen, without reading every weight on every call (item 3's cost)."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch

import torchrefit
import torchrefit.mutable as mutable_module

from helpers import assert_matches, run_eager
from models import MLP, randomize

NAN = float("nan")


def _x() -> tuple[torch.Tensor]:
    return (torch.randn(4, 16),)


@pytest.mark.parametrize("value", [NAN, float("inf")])
@pytest.mark.parametrize("how", ["in_place", "data_write", "load_state_dict"])
def test_a_refused_value_raises_and_never_recompiles(value: float, how: str) -> None:
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = _x()
    before = mutable(*x)
    with torch.no_grad():
        if how == "in_place":
            model.fc2.weight[3, 4] = value
        elif how == "data_write":
            model.fc2.weight.data[3, 4] = value
        else:
            state = model.state_dict()
            state["fc2.weight"] = state["fc2.weight"].clone()
            state["fc2.weight"][3, 4] = value
            model.load_state_dict(state)
    for _ in range(2):  # refused on every call while the weight holds it
        with pytest.raises(torchrefit.WeightValueError, match="fc2.weight"):
            mutable(*x)
    assert mutable.compiles == 1
    variant = mutable._variants[-1].compiled
    assert torch.equal(variant(*x), before)  # the engines kept their weights
    with torch.no_grad():
        model.fc2.weight[3, 4] = 0.25
    assert_matches(mutable(*x), run_eager(model, *x))
    assert mutable.compiles == 1


def test_nan_in_a_lora_adapter_merged_is_refused() -> None:
    peft = pytest.importorskip("peft")
    base = randomize(MLP(), 0)
    config = peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = _x()
    assert_matches(mutable(*x), run_eager(model, *x))
    with torch.no_grad():
        model.base_model.model.fc1.lora_B["default"].weight[0, 0] = NAN
    model.merge_adapter()
    with pytest.raises(torchrefit.WeightValueError):
        mutable(*x)
    assert mutable.compiles == 1


@pytest.mark.parametrize("check_values", [False, True])
def test_an_update_landing_during_a_refit_is_seen_by_the_next_call(
    monkeypatch, check_values: bool
) -> None:
    """What the refit read is recorded before it reads: an optimizer step that lands
    while the engines are being written counts as a change at the next call."""
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager", check_values=check_values)
    x = _x()
    mutable(*x)
    refit = mutable_module.MutableModule._refit
    landed = []

    def refit_while_a_step_lands(self, *args, **kwargs) -> None:
        refit(self, *args, **kwargs)
        if not landed:  # a concurrent trainer's step, right after the engines were written
            with torch.no_grad():
                model.fc1.weight.add_(1.0)
            landed.append(True)

    monkeypatch.setattr(mutable_module.MutableModule, "_refit", refit_while_a_step_lands)
    with torch.no_grad():
        model.fc3.weight.mul_(2.0)
    mutable(*x)  # refits fc3; fc1 changes meanwhile
    assert_matches(mutable(*x), run_eager(model, *x))  # the next call sees fc1 too


def test_data_writes_are_seen_without_reading_unchanged_weights(monkeypatch) -> None:
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = _x()
    mutable(*x)
    compared: list[int] = []
    values = mutable_module.MutableModule._changed_values

    def counting(self, variant, current):
        compared.append(len(current))
        return values(self, variant, current)

    monkeypatch.setattr(mutable_module.MutableModule, "_changed_values", counting)
    for _ in range(3):
        assert_matches(mutable(*x), run_eager(model, *x))
    assert sum(compared) == 0, "unchanged parameters were read by value"
    model.fc3.weight.data += 0.5  # peft's way: no version bump
    assert_matches(mutable(*x), run_eager(model, *x))
    model.fc2.bias.data.copy_(torch.randn(32))  # an RL loader's way
    assert_matches(mutable(*x), run_eager(model, *x))
    model.fc1.weight.data = torch.randn(32, 16)  # new memory
    assert_matches(mutable(*x), run_eager(model, *x))
    assert mutable.compiles == 1 and mutable.refits == 3


def test_a_data_alias_held_across_calls_is_watched_while_it_lives() -> None:
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = _x()
    alias = model.fc2.weight.data
    for step in range(3):
        alias.mul_(0.5)  # a write through an alias taken before the last call
        assert_matches(mutable(*x), run_eager(model, *x)), step
    del alias
    refits = mutable.refits
    mutable(*x)
    mutable(*x)
    assert mutable.refits <= refits + 1  # once the alias is gone, calls stop refitting


def test_watched_parameters_stay_parameters_and_go_back_when_released() -> None:
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager")
    mutable(*_x())
    weight = model.fc1.weight
    assert isinstance(weight, torch.nn.Parameter) and type(weight).__name__ == "Parameter"
    assert type(pickle.loads(pickle.dumps(weight))) is torch.nn.Parameter
    assert type(copy.deepcopy(model).fc1.weight) is torch.nn.Parameter
    assert torch.equal(pickle.loads(pickle.dumps(model)).fc1.weight, weight)
    del mutable
    gc.collect()
    assert type(model.fc1.weight) is torch.nn.Parameter


def test_without_check_values_nothing_is_watched() -> None:
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager", check_values=False)
    mutable(*_x())
    assert type(model.fc1.weight) is torch.nn.Parameter


def test_a_write_through_an_alias_that_then_dies_is_seen() -> None:
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = _x()
    alias = model.fc2.weight.data
    mutable(*x)
    assert_matches(mutable(*x), run_eager(model, *x))  # the alias lives: refitted meanwhile
    alias.copy_(torch.randn_like(alias))
    del alias  # the write landed before it died
    assert_matches(mutable(*x), run_eager(model, *x))


def test_refit_reads_every_weight_for_writes_no_call_can_see() -> None:
    """A write that bypasses both the version counter and `.data` (a NumPy view here; a
    collective writing into a parameter is another) is not seen by calls; refit() is."""
    model = randomize(MLP(), 0)
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = _x()
    mutable(*x)
    view = model.fc1.bias.detach().numpy()
    view[:] = 5.0
    mutable.refit()
    assert_matches(mutable(*x), run_eager(model, *x))
