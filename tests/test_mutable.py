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


# -- what recompiles: the Python state the traced forward read, nothing else -------------------


class Steered(torch.nn.Module):
    """A forward that reads a scale, branches on a flag, reads a table in place, and reads an
    attribute that may be absent (getattr with a default)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
        self.act = torch.nn.Identity()
        self.spare = torch.nn.Linear(8, 8)  # never called
        self.scale = 2.0
        self.flag = False
        self.table = {"shift": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.fc(x)) * self.scale + self.table["shift"]
        if self.flag:
            y = torch.sin(y)
        if getattr(self, "clip", None) is not None:
            y = y.clamp(max=self.clip)
        return y


def steered_inputs():
    return (torch.randn(3, 16),)


def _steered() -> tuple[torchrefit.MutableModule, torch.nn.Module]:
    model = randomize(Steered(), 0).eval()
    mutable = _wrap(model)
    _check(mutable, model, steered_inputs)
    return mutable, model


def test_attributes_the_forward_does_not_read_never_recompile() -> None:
    mutable, model = _steered()
    model._hf_peft_config_loaded = True  # as diffusers' add_adapter sets it
    model.fc.lora_scale = 0.5  # a new attribute on a module the forward calls
    model.spare.in_features = 99  # a changed attribute of a module the forward never calls
    model.spare.extra = "x"
    _check(mutable, model, steered_inputs)
    assert mutable.compiles == 1 and mutable.refits == 0


@pytest.mark.parametrize("change", ["scale", "flag", "table_in_place", "absent_then_set"])
def test_attributes_the_forward_reads_recompile_and_come_back(change: str) -> None:
    mutable, model = _steered()
    before = (model.scale, model.flag, dict(model.table))
    if change == "scale":
        model.scale = 3.0
    elif change == "flag":
        model.flag = True
    elif change == "table_in_place":
        model.table["shift"] = -4.0
    else:
        model.clip = 0.1  # absent when traced: the trace took the other branch
    _check(mutable, model, steered_inputs)
    assert mutable.compiles == 2
    model.scale, model.flag, model.table = before[0], before[1], before[2]
    if change == "absent_then_set":
        del model.clip
    _check(mutable, model, steered_inputs)  # the first variant again: no third compile
    assert mutable.compiles == 2 and mutable.refits == 0


def test_a_scalar_of_another_type_is_another_value() -> None:
    mutable, model = _steered()
    model.flag = True
    _check(mutable, model, steered_inputs)
    model.flag = 1  # branches as True does, but 1 is not True: the key keeps the type
    _check(mutable, model, steered_inputs)
    model.flag = False
    model.scale = 2  # int 2 is not float 2.0 to a trace (type promotion)
    _check(mutable, model, steered_inputs)
    assert mutable.compiles == 4


def test_a_weightless_submodule_replaced_or_a_hook_added_recompiles() -> None:
    mutable, model = _steered()
    model.act = torch.nn.Tanh()  # same weights, another class: structure
    _check(mutable, model, steered_inputs)
    assert mutable.compiles == 2
    handle = model.fc.register_forward_hook(lambda m, args, out: out * 0.5)
    _check(mutable, model, steered_inputs)
    assert mutable.compiles == 3
    handle.remove()
    _check(mutable, model, steered_inputs)
    assert mutable.compiles == 3  # back to the Tanh variant


def test_classes_are_restored_after_a_trace_and_after_a_failed_one() -> None:
    class Fails(Steered):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.flag:
                raise ValueError("no")
            return super().forward(x)

    model = randomize(Fails(), 0).eval()
    classes = {name: type(m) for name, m in model.named_modules()}
    mutable = _wrap(model)
    _check(mutable, model, steered_inputs)
    model.flag = True
    with pytest.raises(torchrefit.TorchRefitError):
        mutable(*steered_inputs())
    assert {name: type(m) for name, m in model.named_modules()} == classes
    model.flag = False
    _check(mutable, model, steered_inputs)
    assert mutable.compiles == 1


def test_a_loaded_module_counts_all_of_the_state_and_save_wants_a_current_variant(
    tmp_path,
) -> None:
    """What the saved trace read is unknown: any attribute changed or added recompiles."""
    mutable, model = _steered()
    mutable.save(str(tmp_path / "m.trf"))
    other = randomize(Steered(), 5).eval()
    loaded = torchrefit.MutableModule.load(str(tmp_path / "m.trf"), other, backend="eager")
    _check(loaded, other, steered_inputs)
    assert loaded.compiles == 0
    other.clip = 0.2  # the forward reads it: the file's graph did not take that branch
    _check(loaded, other, steered_inputs)
    assert loaded.compiles == 1
    model.flag = True  # not called since: no variant stands for the model now
    with pytest.raises(torchrefit.TorchRefitError, match="call the module once"):
        mutable.save(str(tmp_path / "n.trf"))
