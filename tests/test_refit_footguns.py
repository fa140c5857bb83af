"""Each silent failure a peer has shown, pinned: the refit must fail loudly or compute right.

A loud failure is a typed TorchRefitError subclass naming the weight, after which the module
still gives exactly its old outputs, whether the refit was asked in place or not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from safetensors.torch import save_file
from torch import nn

import torchrefit
from torchrefit import (
    ImmutableWeightsError,
    IncompatibleWeightsError,
    MissingWeightError,
    RefitVerificationError,
    TorchRefitError,
    UnexpectedWeightError,
    WeightDtypeError,
    WeightShapeError,
    WeightValueError,
)

import models
from helpers import assert_differs, assert_matches, run_eager

# -- helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A tiny model, how to feed it, and the settings it is compiled with."""

    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    settings: dict[str, Any] = field(default_factory=dict)

    def model(self, seed: int) -> nn.Module:
        return models.randomize(self.make(), seed)

    def compile(self, model: nn.Module) -> torchrefit.CompiledModule:
        return torchrefit.compile(model, self.inputs(), backend="eager", **self.settings)


def _images() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 8, 8),)


MLP = Case(models.MLP, lambda: (torch.randn(4, 16),))
CASES = {
    "mlp": MLP,
    "conv_net": Case(models.ConvNet, _images),
    "conv_net_fallbacks": Case(
        models.ConvNet, _images, {"torch_executed_ops": {"torch.ops.aten.convolution.default"}}
    ),
    "conv_bn": Case(models.ConvBNWithRunningStats, _images),
    "conv_bn_folded": Case(models.ConvBNWithRunningStats, _images, {"fold_batch_norm": True}),
    "lifted_constant": Case(models.LiftedScalarConstant, lambda: (torch.randn(4, 8),)),
    "tied_embeddings": Case(models.TiedEmbeddings, lambda: (torch.randint(0, 20, (4, 5)),)),
}


def leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def assert_identical(before: Any, after: Any) -> None:
    old, new = leaves(before), leaves(after)
    assert len(old) == len(new) > 0
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        assert torch.equal(a, b), f"output {i} changed although the refit failed"


def assert_refused(
    compiled: torchrefit.CompiledModule,
    new_weights: Any,
    error: type[TorchRefitError],
    names: tuple[str, ...],
    inputs: tuple[torch.Tensor, ...],
    **refit_kwargs: Any,
) -> TorchRefitError:
    """The refit raises `error` naming each of `names`; the module's outputs do not move."""
    before = run_eager(compiled, *inputs)
    raised = None
    for in_place in (False, True):
        with pytest.raises(error) as info:
            torchrefit.refit_module_weights(
                compiled, new_weights, in_place=in_place, **refit_kwargs
            )
        raised = info.value
        for name in names:
            assert name in str(raised), f"{type(raised).__name__} does not name {name!r}: {raised}"
        assert_identical(before, run_eager(compiled, *inputs))
    assert raised is not None
    return raised


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, torchrefit.CompiledModule]:
    """MLP weights A and their compiled module; tests here refit it only with refused weights."""
    model = MLP.model(0)
    return model, MLP.compile(model)


# -- weights of another architecture ----------------------------------------------------


Form = Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[Any, dict[str, Any]]]


def _as_module(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, dict[str, Any]]:
    return model, {}


def _as_module_slow(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[Any, dict[str, Any]]:
    return model, {"use_weight_map_cache": False, "arg_inputs": inputs}


def _as_state_dict(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[Any, dict[str, Any]]:
    return clone_state(model), {}


def _as_program(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, dict[str, Any]]:
    return torch.export.export(model, inputs), {}


def _as_program_slow(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[Any, dict[str, Any]]:
    return torch.export.export(model, inputs), {"use_weight_map_cache": False, "arg_inputs": inputs}


FORMS: dict[str, Form] = {
    "module": _as_module,
    "module_slow_path": _as_module_slow,
    "state_dict": _as_state_dict,
    "exported_program": _as_program,
    "exported_program_slow_path": _as_program_slow,
}


@pytest.mark.parametrize("form", list(FORMS))
def test_other_architecture_is_refused(mlp, form):
    _, compiled = mlp
    inputs = MLP.inputs()
    wider, kwargs = FORMS[form](models.randomize(models.MLP(width=48), 1), inputs)
    error = assert_refused(compiled, wider, IncompatibleWeightsError, (), inputs, **kwargs)
    message = str(error)
    # fc1.weight (the first weight, node 0 of the graph) is the first thing that differs
    assert "fc1.weight" in message or "node 0" in message, message


def test_wrong_shape_names_the_weight(mlp):
    _, compiled = mlp
    state = clone_state(MLP.model(1))
    state["fc2.bias"] = torch.randn(33)
    assert_refused(compiled, state, WeightShapeError, ("fc2.bias", "33"), MLP.inputs())


def test_missing_parameter_names_it(mlp):
    _, compiled = mlp
    state = clone_state(MLP.model(1))
    del state["fc3.weight"]
    assert_refused(compiled, state, MissingWeightError, ("fc3.weight",), MLP.inputs())


def test_extra_key_names_it(mlp):
    _, compiled = mlp
    state = clone_state(MLP.model(1))
    state["fc4.weight"] = torch.randn(4, 4)
    assert_refused(compiled, state, UnexpectedWeightError, ("fc4.weight",), MLP.inputs())


@pytest.mark.parametrize("form", ["module", "state_dict", "exported_program"])
def test_bf16_weights_for_fp32_engine(mlp, form):
    _, compiled = mlp
    model_bf16 = MLP.model(1).to(torch.bfloat16)
    inputs_bf16 = tuple(x.to(torch.bfloat16) for x in MLP.inputs())
    new_weights, kwargs = FORMS[form](model_bf16, inputs_bf16)
    error = assert_refused(
        compiled, new_weights, WeightDtypeError, ("bfloat16",), MLP.inputs(), **kwargs
    )
    assert any(fqn in str(error) for fqn in model_bf16.state_dict()), error


def test_immutable_weights_refuses_refit():
    compiled = torchrefit.compile(
        MLP.model(0), MLP.inputs(), backend="eager", immutable_weights=True
    )
    assert_refused(
        compiled, MLP.model(1), ImmutableWeightsError, ("immutable_weights",), MLP.inputs()
    )


# -- values an fp16 engine cannot hold ---------------------------------------------------


def _fp16_by_settings() -> tuple[torchrefit.CompiledModule, dict[str, torch.Tensor], tuple]:
    """An fp32 model compiled for fp16 engines; fp32 weights holding 1e6 overflow the cast."""
    compiled = torchrefit.compile(MLP.model(0), MLP.inputs(), backend="eager", dtype="float16")
    return compiled, clone_state(MLP.model(1)), MLP.inputs()


def test_value_too_large_for_fp16_engine():
    compiled, state, inputs = _fp16_by_settings()
    state["fc2.weight"][3, 5] = 1e6
    assert torch.isfinite(run_eager(compiled, *inputs)).all()
    assert_refused(compiled, state, WeightValueError, ("fc2.weight", "1e+06"), inputs)


def test_fp32_weights_for_half_model_are_refused():
    """An fp16 model's engines take fp16 weights: fp32 ones holding 1e6 fail, never become inf."""
    model = MLP.model(0).half()
    inputs = (MLP.inputs()[0].half(),)
    compiled = torchrefit.compile(model, inputs, backend="eager")
    state = clone_state(MLP.model(1))
    state["fc2.weight"][3, 5] = 1e6
    error = assert_refused(compiled, state, IncompatibleWeightsError, (), inputs)
    assert isinstance(error, (WeightDtypeError, WeightValueError)), error
    assert "float16" in str(error)


# -- tied weights ------------------------------------------------------------------------


TIED = CASES["tied_embeddings"]


def test_tied_weights_given_two_values_are_refused():
    compiled = TIED.compile(TIED.model(0))
    state = clone_state(TIED.model(1))
    assert set(state) == {"embed.weight", "out.weight"}
    state["out.weight"] = state["out.weight"] + 1.0
    names = ("out.weight", "embed.weight")
    assert_refused(compiled, state, IncompatibleWeightsError, names, TIED.inputs())


@pytest.mark.parametrize(
    "keys", [("embed.weight", "out.weight"), ("embed.weight",), ("out.weight",)]
)
def test_tied_weights_given_once_or_twice_compute_right(keys):
    model_a, model_b = TIED.model(0), TIED.model(1)
    compiled = TIED.compile(model_a)
    state = {k: v for k, v in clone_state(model_b).items() if k in keys}
    refitted = torchrefit.refit_module_weights(compiled, state)
    inputs = TIED.inputs()
    assert_matches(run_eager(refitted, *inputs), run_eager(model_b, *inputs))
    assert_differs(run_eager(refitted, *inputs), run_eager(model_a, *inputs))


# -- layouts: non-contiguous weights and views with a storage offset ---------------------


def _transposed(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape[::-1]).t()


def _offset_view(shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.randn(200)
    return flat[37 : 37 + shape[0] * shape[1]].view(shape)


def _offset_transposed(shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.randn(200)
    return flat[11 : 11 + shape[0] * shape[1]].view(shape[::-1]).t()


NON_CONTIGUOUS = Case(models.NonContiguousWeight, lambda: (torch.randn(4, 6),))
LAYOUTS = {
    "transposed": _transposed,
    "offset_view": _offset_view,
    "offset_transposed": _offset_transposed,
}


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_weight_computes_right(layout, in_place):
    case = NON_CONTIGUOUS
    model_a = case.model(0)
    compiled = case.compile(model_a)
    weight = LAYOUTS[layout]((4, 6))
    bias = torch.randn(64)[5:9]  # a view with a storage offset too
    assert weight.shape == (4, 6)
    assert not weight.is_contiguous() or weight.storage_offset() > 0
    expected_model = copy.deepcopy(model_a)
    expected_model.load_state_dict({"fc.weight": weight.contiguous(), "fc.bias": bias.clone()})

    refitted = torchrefit.refit_module_weights(
        compiled, {"fc.weight": weight, "fc.bias": bias}, in_place=in_place
    )
    inputs = case.inputs()
    assert_matches(run_eager(refitted, *inputs), run_eager(expected_model, *inputs))
    assert_differs(run_eager(refitted, *inputs), run_eager(model_a, *inputs))


def test_strided_weight_in_square_layer_computes_right():
    """A transposed square weight has the right shape by construction: only values tell."""
    model_a = MLP.model(0)
    compiled = MLP.compile(model_a)
    state = clone_state(MLP.model(1))
    state["fc2.weight"] = _transposed((32, 32))
    expected_model = copy.deepcopy(model_a)
    expected_model.load_state_dict({k: v.contiguous() for k, v in state.items()})
    refitted = torchrefit.refit_module_weights(compiled, state)
    inputs = MLP.inputs()
    assert_matches(run_eager(refitted, *inputs), run_eager(expected_model, *inputs))
    assert_differs(run_eager(refitted, *inputs), run_eager(model_a, *inputs))


# -- stale weights ------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(CASES))
def test_no_stale_weights_after_refit(name, form):
    """Compile with A, refit with B: every output leaves A's eager output and matches B's."""
    case = CASES[name]
    model_a, model_b = case.model(0), case.model(1)
    compiled = case.compile(model_a)
    inputs = case.inputs()
    eager_a = run_eager(model_a, *inputs)
    if form == "state_dict":  # a state_dict holds no lifted constants: eager keeps A's too
        eager_b_model = copy.deepcopy(model_a)
        eager_b_model.load_state_dict(model_b.state_dict())
    else:
        eager_b_model = model_b
    eager_b = run_eager(eager_b_model, *inputs)
    before = run_eager(compiled, *inputs)
    new_weights, kwargs = FORMS[form](model_b, case.inputs())

    refitted = torchrefit.refit_module_weights(compiled, new_weights, **kwargs)
    assert_identical(before, run_eager(compiled, *inputs))  # not in place: A is untouched
    in_place = torchrefit.refit_module_weights(compiled, new_weights, in_place=True, **kwargs)
    assert in_place is compiled
    for result in (refitted, in_place):
        got = run_eager(result, *inputs)
        assert_matches(got, eager_b)
        for out, old in zip(leaves(got), leaves(eager_a), strict=True):
            assert_differs(out, old)


@pytest.mark.parametrize(
    "buffer", ["bn1.running_var", "bn2.running_var", "bn1.running_mean", "bn2.weight"]
)
def test_batch_norm_statistics_alone_change_outputs(buffer):
    """Only one batch norm tensor changes: the folded convolution weights must be recomputed."""
    case = CASES["conv_bn_folded"]
    model_a = case.model(0)
    compiled = case.compile(model_a)
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        tensor = (
            model_b.get_parameter(buffer)
            if buffer.endswith("weight")
            else model_b.get_buffer(buffer)
        )
        tensor.mul_(4.0).add_(0.5)
    state_b = clone_state(model_b)
    changed = [k for k, v in state_b.items() if not torch.equal(v, model_a.state_dict()[k])]
    assert changed == [buffer]

    inputs = case.inputs()
    for in_place in (False, True):
        refitted = torchrefit.refit_module_weights(compiled, state_b, in_place=in_place)
        assert_matches(run_eager(refitted, *inputs), run_eager(model_b, *inputs))
        assert_differs(run_eager(refitted, *inputs), run_eager(model_a, *inputs))


REAL = {
    "resnet": (models.resnet, lambda: (torch.randn(2, 3, 32, 32),)),
    "gpt2": (models.gpt2, lambda: (torch.randint(0, 64, (2, 8)),)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_no_stale_weights_in_real_models(name):
    """ResNet folds batch norms, GPT-2 ties its embeddings: B's outputs, in every output."""
    build, make_inputs = REAL[name]
    model_a, model_b = build(0), build(1)
    compiled = torchrefit.compile(model_a, make_inputs(), backend="eager")
    refitted = torchrefit.refit_module_weights(compiled, model_b)
    inputs = make_inputs()
    got = run_eager(refitted, *inputs)
    assert_matches(got, run_eager(model_b, *inputs))
    for out, old in zip(leaves(got), leaves(run_eager(model_a, *inputs)), strict=True):
        assert_differs(out, old)


def test_compiled_module_owns_its_weights():
    """Training A after compiling, or B after refitting, must not leak into the engines."""
    model_a, model_b = MLP.model(0), MLP.model(1)
    compiled = MLP.compile(model_a)
    refitted = torchrefit.refit_module_weights(compiled, model_b)
    inputs = MLP.inputs()
    before_a, before_b = run_eager(compiled, *inputs), run_eager(refitted, *inputs)
    with torch.no_grad():
        for model in (model_a, model_b):
            for parameter in model.parameters():
                parameter.mul_(-2.0)
    assert_identical(before_a, run_eager(compiled, *inputs))
    assert_identical(before_b, run_eager(refitted, *inputs))


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 4))


def test_sequential_model_refits():
    """nn.Sequential (forward's argument is named `input`) compiles and refits without stale
    weights."""
    case = Case(_sequential, MLP.inputs)
    model_a, model_b = case.model(0), case.model(1)
    refitted = torchrefit.refit_module_weights(case.compile(model_a), model_b)
    inputs = case.inputs()
    assert_matches(run_eager(refitted, *inputs), run_eager(model_b, *inputs))
    assert_differs(run_eager(refitted, *inputs), run_eager(model_a, *inputs))


# -- a failed in-place refit changes nothing ------------------------------------------------


class MLPWithReLU(models.MLP):
    """The MLP's names and shapes with another forward: only verification can tell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _last_weight_bad_shape(inputs):
    state = clone_state(MLP.model(1))
    state["fc3.bias"] = torch.randn(5)  # every earlier weight is valid
    return state, WeightShapeError, {}


def _last_weight_bad_dtype(inputs):
    state = clone_state(MLP.model(1))
    state["fc3.bias"] = state["fc3.bias"].double()
    return state, WeightDtypeError, {}


def _verification_fails(inputs):
    model = models.randomize(MLPWithReLU(), 1)
    return model, RefitVerificationError, {"arg_inputs": inputs, "verify_output": True}


@pytest.mark.parametrize(
    "failure",
    [_last_weight_bad_shape, _last_weight_bad_dtype, _verification_fails],
    ids=["shape", "dtype", "verification"],
)
def test_failed_in_place_refit_leaves_outputs_identical(failure):
    compiled = MLP.compile(MLP.model(0))
    inputs = MLP.inputs()
    before = run_eager(compiled, *inputs)
    stored = {k: t.clone() for k, t in compiled._torchrefit.store.tensors.items()}
    new_weights, error, kwargs = failure(inputs)
    with pytest.raises(error):
        torchrefit.refit_module_weights(compiled, new_weights, in_place=True, **kwargs)
    assert_identical(before, run_eager(compiled, *inputs))
    for key, value in compiled._torchrefit.store.tensors.items():
        assert torch.equal(value, stored[key]), f"engine constant {key!r} changed"


def test_failed_fp16_refit_in_place_leaves_outputs_identical():
    compiled, state, inputs = _fp16_by_settings()
    state["fc3.weight"][0, 0] = -1e6  # the last weight matrix; the others are valid
    before = run_eager(compiled, *inputs)
    with pytest.raises(WeightValueError):
        torchrefit.refit_module_weights(compiled, state, in_place=True)
    assert_identical(before, run_eager(compiled, *inputs))


def test_failed_folded_weight_refit_leaves_outputs_identical():
    """A variance below -eps makes the folded weights NaN: refused after evaluation, pre-commit."""
    case = CASES["conv_bn_folded"]
    compiled = case.compile(case.model(0))
    state = clone_state(case.model(1))
    state["bn1.running_var"] = -state["bn1.running_var"]
    stored = {k: t.clone() for k, t in compiled._torchrefit.store.tensors.items()}
    assert_refused(compiled, state, WeightValueError, ("bn1.running_var",), case.inputs())
    for key, value in compiled._torchrefit.store.tensors.items():
        assert torch.equal(value, stored[key]), f"engine constant {key!r} changed"


# -- weights are data: never unpickled ------------------------------------------------------


@pytest.mark.parametrize("source", ["state_dict", "safetensors"])
def test_weights_are_never_unpickled(source, tmp_path, unpickling_calls):
    case = CASES["conv_bn_folded"]
    model_a, model_b = case.model(0), case.model(1)
    compiled = case.compile(model_a)
    state = clone_state(model_b)
    if source == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
        new_weights: Any = str(path)
    else:
        new_weights = state
    refitted = torchrefit.refit_module_weights(compiled, new_weights)
    inputs = case.inputs()
    assert_matches(run_eager(refitted, *inputs), run_eager(model_b, *inputs))
    assert_differs(run_eager(refitted, *inputs), run_eager(model_a, *inputs))
    assert unpickling_calls == []


# -- found in review ----------------------------------------------------------------------


def test_bfloat16_into_float16_overflow_is_refused() -> None:
    model = torch.nn.Linear(4, 4).bfloat16().eval()
    compiled = torchrefit.compile(
        model, (torch.randn(2, 4, dtype=torch.bfloat16),), backend="eager", dtype="float16"
    )
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["weight"][0, 0] = 1e6
    with pytest.raises(torchrefit.WeightValueError, match="overflows"):
        torchrefit.refit_module_weights(compiled, weights)
    with pytest.raises(torchrefit.WeightValueError, match="overflows"):
        torchrefit.Refitter(compiled, weights)()


def test_overflow_at_compile_is_refused() -> None:
    model = torch.nn.Linear(4, 4).eval()
    with torch.no_grad():
        model.weight[0, 0] = 1e6
    with pytest.raises(torchrefit.WeightValueError, match="weight"):
        torchrefit.compile(model, (torch.randn(2, 4),), backend="eager", dtype="float16")


@pytest.mark.parametrize("failure", ["no_inputs", "reference_raises"])
def test_verification_that_cannot_run_changes_nothing(failure: str, monkeypatch) -> None:
    a, b = torch.nn.Linear(4, 4).eval(), torch.nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    before = compiled(x)
    if failure == "no_inputs":
        with pytest.raises(torchrefit.TorchRefitError, match="arg_inputs"):
            torchrefit.refit_module_weights(compiled, b, verify_output=True, in_place=True)
    else:
        import torchrefit.refit.verify as verify

        def broken(*args):
            raise RuntimeError("the reference model failed")

        monkeypatch.setattr(verify, "_reference", broken)
        with pytest.raises(RuntimeError, match="reference"):
            torchrefit.refit_module_weights(
                compiled, b, arg_inputs=(x,), verify_output=True, in_place=True
            )
    assert torch.equal(compiled(x), before)


def test_constant_created_in_forward_refits_from_a_module() -> None:
    class WithConstant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + torch.tensor([3.0])

    a, b = WithConstant().eval(), WithConstant().eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    torchrefit.Refitter(compiled, b)()
    with torch.no_grad():
        assert torch.allclose(compiled(x), b(x))


def test_refitter_refuses_a_file(tmp_path) -> None:
    from safetensors.torch import save_file

    a = torch.nn.Linear(4, 4).eval()
    compiled = torchrefit.compile(a, (torch.randn(2, 4),), backend="eager")
    save_file(a.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(torchrefit.TorchRefitError, match="refit_module_weights"):
        torchrefit.Refitter(compiled, str(tmp_path / "w.safetensors"))


def test_swapping_the_engines_own_constants_is_exact() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(model, (x,), backend="eager")
    c = compiled.engines()["_engine_0"].constants()
    swapped = {
        "0.weight": c["1.weight"],
        "0.bias": c["1.bias"],
        "1.weight": c["0.weight"],
        "1.bias": c["0.bias"],
    }
    expected = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).eval()
    expected.load_state_dict({k: v.clone() for k, v in swapped.items()})
    torchrefit.refit_module_weights(compiled, swapped, in_place=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), expected(x))


def test_unknown_torch_executed_ops_are_refused() -> None:
    with pytest.raises(torchrefit.SettingsError, match="convolutoin"):
        torchrefit.Settings(torch_executed_ops=frozenset({"torch.ops.aten.convolutoin.default"}))


@pytest.mark.parametrize(
    "content", [b"\x80\x02}q\x00.", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"]
)
def test_files_that_are_not_safetensors_are_refused(tmp_path, content: bytes) -> None:
    a = torch.nn.Linear(4, 4).eval()
    compiled = torchrefit.compile(a, (torch.randn(2, 4),), backend="eager")
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="safetensors"):
        torchrefit.refit_module_weights(compiled, str(path))
