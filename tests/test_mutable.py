"""MutableModule: refits when weights change, recompiles when structure does, never stale."""

from __future__ import annotations

import pytest
import torch

import torchrefit

from cases import CASES
from helpers import assert_matches, run_eager
from models import MLP, ConvBNWithRunningStats, randomize


def _wrap(model: torch.nn.Module) -> torchrefit.MutableModule:
    return torchrefit.MutableModule(model, backend="eager")


def _check(mutable: torchrefit.MutableModule, model: torch.nn.Module, make_inputs) -> None:
    x = make_inputs()
    assert_matches(mutable(*x), run_eager(model, *x))


def mlp_inputs():
    return (torch.randn(4, 16),)


@pytest.mark.parametrize(
    "change",
    [
        "load_state_dict",
        "in_place_mul",
        "replaced_parameter",
        "optimizer_step",
        "data_write",
        "buffer_update",
    ],
)
def test_weight_changes_refit_without_recompiling(change: str) -> None:
    model = (
        randomize(ConvBNWithRunningStats(), 0) if change == "buffer_update" else randomize(MLP(), 0)
    )
    make_inputs = (
        (lambda: (torch.randn(2, 3, 12, 12),)) if change == "buffer_update" else mlp_inputs
    )
    mutable = _wrap(model)
    _check(mutable, model, make_inputs)
    with torch.no_grad():
        if change == "load_state_dict":
            model.load_state_dict(randomize(MLP(), 1).state_dict())
        elif change == "in_place_mul":
            model.fc2.weight.mul_(-2.0)
        elif change == "replaced_parameter":
            model.fc1.weight = torch.nn.Parameter(torch.randn(32, 16))
        elif change == "data_write":  # how peft merges LoRA: no version bump
            model.fc3.weight.data += 0.5
        elif change == "buffer_update":
            model.bn1.running_var.mul_(3.0)
    if change == "optimizer_step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(*mlp_inputs()).square().sum().backward()
        optimizer.step()
    _check(mutable, model, make_inputs)
    assert mutable.compiles == 1 and mutable.refits == 1


def test_unchanged_model_neither_refits_nor_recompiles() -> None:
    model = randomize(MLP(), 0)
    mutable = _wrap(model)
    for _ in range(3):
        _check(mutable, model, mlp_inputs)
    assert mutable.compiles == 1 and mutable.refits == 0


def test_shape_change_recompiles() -> None:
    model = randomize(MLP(), 0)
    mutable = _wrap(model)
    _check(mutable, model, mlp_inputs)
    model.fc3 = torch.nn.Linear(32, 6)
    _check(mutable, model, mlp_inputs)
    _check(mutable, model, lambda: (torch.randn(7, 16),))  # another input shape
    assert mutable.compiles == 3


def test_behaves_like_the_model_and_leaves_it_in_place() -> None:
    model = randomize(MLP(), 0)
    mutable = _wrap(model)
    mutable(*mlp_inputs())
    assert mutable.fc1 is model.fc1
    assert list(mutable.state_dict()) == list(model.state_dict())
    assert all(p.device.type == "cpu" for p in model.parameters())
    mutable.load_state_dict(randomize(MLP(), 3).state_dict())
    _check(mutable, model, mlp_inputs)


def test_training_flag_is_structure() -> None:
    case = CASES["bert"]
    model = case.build(0)
    mutable = _wrap(model)
    _check(mutable, model, case.inputs)
    model.train()
    torch.manual_seed(0)
    x = case.inputs()
    model.eval()
    mutable(*x)
    assert mutable.compiles == 1


def test_save_and_explicit_control(tmp_path) -> None:
    model = randomize(MLP(), 0)
    mutable = _wrap(model)
    mutable(*mlp_inputs())
    with torch.no_grad():
        model.fc1.weight.data.zero_()
    mutable.refit()
    assert mutable.refits == 1
    mutable.save(str(tmp_path / "m.trf"))
    loaded = torchrefit.load(str(tmp_path / "m.trf"))
    x = mlp_inputs()
    assert_matches(loaded(*x), run_eager(model, *x))
    mutable.recompile()
    _check(mutable, model, mlp_inputs)
    assert mutable.compiles == 2


def test_lora_merge_and_unmerge_stay_exact() -> None:
    peft = pytest.importorskip("peft")
    case = CASES["bert"]
    base = case.build(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, config).eval()
    mutable = _wrap(model)
    _check(mutable, model, case.inputs)
    for _ in range(2):
        model.merge_adapter()
        _check(mutable, model, case.inputs)
        model.unmerge_adapter()
        _check(mutable, model, case.inputs)
    assert mutable.compiles == 1  # merging and unmerging are refits
    with torch.no_grad():  # a new adapter: merging it changes the base weights again
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    model.merge_adapter()
    refits = mutable.refits
    _check(mutable, model, case.inputs)
    assert mutable.refits == refits + 1 and mutable.compiles == 1


def test_load_wraps_a_saved_module_and_refits_the_models_weights(tmp_path) -> None:
    model = randomize(MLP(), 0)
    mutable = _wrap(model)
    mutable(*mlp_inputs())
    mutable.save(str(tmp_path / "m.trf"))
    other = randomize(MLP(), 5)
    loaded = torchrefit.MutableModule.load(str(tmp_path / "m.trf"), other)
    _check(loaded, other, mlp_inputs)
    assert loaded.compiles == 0 and loaded.refits == 1
