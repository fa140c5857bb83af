"""The canonical refit test: compile with weights A, refit with B, compare with eager B."""

from __future__ import annotations

import pytest
import torch

import torchrefit
from torchrefit.module import Engine, Fallback

from cases import CASES
from helpers import assert_differs, assert_matches, run_eager
from models import ConvNet, randomize

EAGER = {"backend": "eager"}


def _as(kind: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    if kind == "module":
        return model
    if kind == "state_dict":
        return model.state_dict()
    return torch.export.export(model, inputs, strict=False)


@pytest.mark.parametrize("kind", ["module", "state_dict", "exported_program"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_refit_matches_eager_with_new_weights(name: str, kind: str) -> None:
    case = CASES[name]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER, **case.settings)
    new = _as(kind, b, case.inputs())
    if kind == "state_dict" and name == "scalar_constant":
        pytest.skip("a plain tensor attribute is not in a state_dict: covered below")
    refitted = torchrefit.refit_module_weights(compiled, new)
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))
    assert_differs(refitted(*x), run_eager(a, *x))
    assert_matches(compiled(*x), run_eager(a, *x))  # in_place=False left the original as it was


def test_plain_tensor_attribute_change_reaches_the_engine() -> None:
    case = CASES["scalar_constant"]
    a = case.build(0)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    b = case.build(0)
    b.scale = torch.tensor(-3.0)
    refitted = torchrefit.refit_module_weights(compiled, b)
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))
    assert_differs(refitted(*x), run_eager(a, *x))


def test_bert_compares_every_output_field() -> None:
    case = CASES["bert"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    refitted = torchrefit.refit_module_weights(compiled, b)
    x = case.inputs()
    out, ref = refitted(*x), run_eager(b, *x)
    assert type(out) is type(ref)
    assert_matches(out.last_hidden_state, ref.last_hidden_state)
    assert_matches(out.pooler_output, ref.pooler_output)


def test_three_refits_in_a_row_in_place() -> None:
    case = CASES["conv_bn"]
    compiled = torchrefit.compile(case.build(0), case.inputs(), **EAGER)
    before = compiled._torchrefit.store.tensors
    pointers = {k: t.data_ptr() for k, t in before.items()}
    for seed in (1, 2, 3):
        model = case.build(seed)
        same = torchrefit.refit_module_weights(compiled, model, in_place=True)
        assert same is compiled
        x = case.inputs()
        assert_matches(compiled(*x), run_eager(model, *x))
    after = {k: t.data_ptr() for k, t in compiled._torchrefit.store.tensors.items()}
    assert after == pointers  # constants keep their addresses (invariant 4)


def test_in_place_false_shares_compiled_code_not_weights() -> None:
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    refitted = torchrefit.refit_module_weights(compiled, b, in_place=False)
    assert refitted is not compiled
    old, new = compiled.engines(), refitted.engines()
    assert all(old[n].runner is new[n].runner for n in old)
    for key, tensor in compiled._torchrefit.store.tensors.items():
        assert tensor.data_ptr() != refitted._torchrefit.store[key].data_ptr()


def test_torch_executed_ops_makes_engines_and_fallbacks() -> None:
    a, b = randomize(ConvNet(), 0), randomize(ConvNet(), 1)
    x = (torch.randn(2, 3, 10, 10),)
    compiled = torchrefit.compile(
        a, x, torch_executed_ops={"torch.ops.aten.convolution.default"}, **EAGER
    )
    assert len(compiled.engines()) >= 2 and len(compiled.fallbacks()) >= 2
    for fallback in compiled.fallbacks().values():
        assert isinstance(fallback, torch.fx.GraphModule) and isinstance(fallback, Fallback)
        assert any(n.target == torch.ops.aten.convolution.default for n in fallback.graph.nodes)
    for engine in compiled.engines().values():
        assert isinstance(engine, Engine)
        assert not any(
            n.target == torch.ops.aten.convolution.default
            for n in engine.runner.graph.nodes  # eager runner: the partition's graph
        )
    refitted = torchrefit.refit_module_weights(compiled, b)
    y = (torch.randn(2, 3, 10, 10),)
    assert_matches(refitted(*y), run_eager(b, *y))
    assert_differs(refitted(*y), run_eager(a, *y))


def test_min_block_size_keeps_small_runs_in_pytorch() -> None:
    a = randomize(ConvNet(), 0)
    x = (torch.randn(2, 3, 10, 10),)
    compiled = torchrefit.compile(
        a, x, torch_executed_ops={"torch.ops.aten.convolution.default"}, min_block_size=100, **EAGER
    )
    assert not compiled.engines()
    assert_matches(compiled(*x), run_eager(a, *x))


def test_dynamic_batch_survives_refit() -> None:
    case = CASES["conv_bn"]
    a, b = case.build(0), case.build(1)
    batch = torch.export.Dim("batch", min=1, max=16)
    export = lambda m: torch.export.export(m, case.inputs(), dynamic_shapes=({0: batch},))  # noqa: E731
    compiled = torchrefit.compile(export(a), case.inputs(), **EAGER)
    refitted = torchrefit.refit_module_weights(compiled, export(b))
    for n in (3, 7):
        x = (torch.randn(n, 3, 12, 12),)
        assert_matches(refitted(*x), run_eager(b, *x))


@pytest.mark.parametrize("use_cache", [True, False])
def test_fast_and_slow_path_both_right(use_cache: bool) -> None:
    case = CASES["conv_bn_folded"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER, **case.settings)
    ep = torch.export.export(b, case.inputs())
    x = case.inputs()
    refitted = torchrefit.refit_module_weights(
        compiled, ep, arg_inputs=x, verify_output=True, use_weight_map_cache=use_cache
    )
    assert_matches(refitted(*x), run_eager(b, *x))


def test_fast_path_runs_no_lowering_or_export(monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES["conv_bn"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    ep = torch.export.export(b, case.inputs())

    def forbidden(*args, **kwargs):
        raise AssertionError("the fast path lowered, partitioned or exported")

    import torchrefit.refit.match as match

    monkeypatch.setattr(match, "lower", forbidden)
    monkeypatch.setattr(match, "export_model", forbidden)
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", forbidden)
    monkeypatch.setattr(torchrefit.partition, "partition", forbidden)
    refitted = torchrefit.refit_module_weights(compiled, ep)
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))
    with pytest.raises(AssertionError, match="fast path"):  # the patch does bite the slow path
        torchrefit.refit_module_weights(compiled, ep, use_weight_map_cache=False)


def test_renamed_weights_take_the_slow_path() -> None:
    """Same structure, other FQNs: the slow path matches by graph position."""

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    ep = torch.export.export(Wrapped(b), case.inputs())
    refitted = torchrefit.refit_module_weights(compiled, ep)
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))


def test_verify_output_compares_every_output() -> None:
    """A stale second output must be caught, not just the first (Torch-TensorRT checks one)."""
    a, b = randomize(ConvNet(), 0), randomize(ConvNet(), 1)
    x = (torch.randn(2, 3, 10, 10),)
    compiled = torchrefit.compile(a, x, **EAGER)
    refitted = torchrefit.refit_module_weights(compiled, b, arg_inputs=x, verify_output=True)
    assert_matches(refitted(*x), run_eager(b, *x))
    from torchrefit.refit.verify import compare_outputs

    good = run_eager(b, *x)
    stale = (good[0], good[1] + 1.0)
    assert "[1]" in (compare_outputs(stale, good) or "")


def test_verification_failure_raises_and_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    x = case.inputs()
    before = compiled(*x)
    import torchrefit.refit.verify as verify

    monkeypatch.setattr(verify, "_reference", lambda *args: run_eager(a, *x) * 2)
    with pytest.raises(torchrefit.RefitVerificationError, match="relative error"):
        torchrefit.refit_module_weights(
            compiled, b, arg_inputs=x, verify_output=True, in_place=True
        )
    assert torch.equal(compiled(*x), before)


def test_weight_map_records_batch_norm_folding() -> None:
    case = CASES["conv_bn_folded"]
    compiled = torchrefit.compile(case.build(0), case.inputs(), **EAGER, **case.settings)
    folded = {k: v for k, v in compiled.weight_map().items() if v.kind == "program"}
    assert "~bn_folded:conv1.weight" in folded
    sources = set(folded["~bn_folded:conv1.bias"].sources)
    assert {
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.weight",
        "bn1.bias",
        "conv1.bias",
    } <= sources
    # the folded convolution's raw weights are not engine constants any more
    assert "conv1.weight" not in compiled._torchrefit.store.tensors


def test_kwarg_inputs() -> None:
    case = CASES["bert"]
    a, b = case.build(0), case.build(1)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    compiled = torchrefit.compile(a, (ids,), {"attention_mask": mask}, **EAGER)
    refitted = torchrefit.refit_module_weights(compiled, b)
    mask[1, 5:] = 0
    assert_matches(
        refitted(ids, attention_mask=mask),
        run_eager(b, ids) if False else b(ids, attention_mask=mask),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_setting_casts_weights_and_inputs(dtype: torch.dtype) -> None:
    import copy

    case = CASES["conv_bn"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), dtype=dtype, **EAGER)
    assert all(
        t.dtype == dtype
        for t in compiled._torchrefit.store.tensors.values()
        if t.is_floating_point()
    )
    assert {v.kind for k, v in compiled.weight_map().items() if not k.startswith("~")} == {"cast"}
    refitted = torchrefit.refit_module_weights(compiled, b)  # float32 weights, cast on the way in
    x = case.inputs()
    out = refitted(*x)  # float32 inputs are cast to the engine dtype
    assert out.dtype == dtype
    assert_matches(out, run_eager(copy.deepcopy(b).to(dtype), x[0].to(dtype)))


@pytest.mark.parametrize("name", ["conv_bn", "conv_bn_folded"])
def test_refitter_reads_the_bound_tensors_current_values(name: str) -> None:
    case = CASES[name]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER, **case.settings)
    refitter = torchrefit.Refitter(compiled, b)
    for step in range(3):
        with torch.no_grad():  # a training step, in place
            for p in b.parameters():
                p.mul_(0.9).add_(0.01 * step)
            b.bn1.running_var.add_(0.5)
        refitter()
        x = case.inputs()
        assert_matches(compiled(*x), run_eager(b, *x))


def test_refitter_refuses_non_finite_folded_weights_and_changes_nothing() -> None:
    case = CASES["conv_bn_folded"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER, **case.settings)
    refitter = torchrefit.Refitter(compiled, b)
    x = case.inputs()
    before = compiled(*x)
    with torch.no_grad():
        b.bn2.running_var.fill_(-1.0)  # rsqrt of a negative: NaN folded weights
    with pytest.raises(torchrefit.WeightValueError, match="bn_folded"):
        refitter()
    assert torch.equal(compiled(*x), before)


def test_refitter_without_the_finiteness_check_copies_what_it_is_given() -> None:
    """check_finite=False: the new values go in unread (a trainer known to be finite);
    the default refuses the same values."""
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    unchecked = torchrefit.Refitter(compiled, b, check_finite=False)
    unchecked()
    x = case.inputs()
    assert_matches(compiled(*x), run_eager(b, *x))
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(torchrefit.WeightValueError):
        torchrefit.Refitter(compiled, b)()
    unchecked()
    assert torch.isnan(compiled(*x)).any()


def test_safetensors_file_refit_and_damaged_files(tmp_path) -> None:
    from safetensors.torch import save_file

    case = CASES["gpt2"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    path = tmp_path / "b.safetensors"
    tensors = {k: v for k, v in b.state_dict().items() if k != "lm_head.weight"}  # tied: one copy
    tensors["odd"] = torch.ones(3, dtype=torch.int8)  # makes later tensors misaligned
    save_file({"odd": tensors.pop("odd"), **tensors}, str(path))
    with pytest.raises(torchrefit.UnexpectedWeightError, match="odd"):
        torchrefit.refit_module_weights(compiled, str(path))
    save_file(tensors, str(path))
    refitted = torchrefit.refit_module_weights(compiled, str(path))
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="do not fit|ends early"):
        torchrefit.refit_module_weights(compiled, str(path))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="safetensors"):
        torchrefit.refit_module_weights(compiled, str(path))
    assert_matches(compiled(*x), run_eager(a, *x))


def test_misaligned_safetensors_tensors_are_read_right(tmp_path) -> None:
    from safetensors.torch import save_file

    from torchrefit.refit.files import index_safetensors, read_tensor

    values = {
        "a": torch.ones(3, dtype=torch.int8),
        "b": torch.randn(5, 7),
        "c": torch.randn(2, dtype=torch.float16),
    }
    save_file(values, str(tmp_path / "m.safetensors"))
    read = {
        k: read_tensor(t) for k, t in index_safetensors(str(tmp_path / "m.safetensors")).items()
    }
    for k, v in values.items():
        assert torch.equal(read[k], v), k


def test_name_map_for_prefixed_checkpoints(tmp_path) -> None:
    from safetensors.torch import save_file

    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), **EAGER)
    checkpoint = {f"model.{k}": v for k, v in b.state_dict().items()}
    checkpoint["optimizer.step"] = torch.tensor(3.0)
    save_file(checkpoint, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(torchrefit.UnexpectedWeightError, match="name_map") as error:
        torchrefit.refit_module_weights(compiled, str(tmp_path / "ckpt.safetensors"))
    assert "model.fc1.weight" in str(error.value) and "lack 6" in str(error.value)

    def strip(name: str) -> str | None:
        return None if name.startswith("optimizer.") else name.removeprefix("model.")

    refitted = torchrefit.refit_module_weights(
        compiled, str(tmp_path / "ckpt.safetensors"), name_map=strip
    )
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))
    renamed = {
        "layer1.weight": b.fc1.weight,
        **{k: v for k, v in b.state_dict().items() if k != "fc1.weight"},
    }
    refitted = torchrefit.refit_module_weights(
        compiled, renamed, name_map={"layer1.weight": "fc1.weight"}
    )
    assert_matches(refitted(*x), run_eager(b, *x))
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="both"):
        torchrefit.refit_module_weights(compiled, renamed, name_map=lambda n: "fc1.weight")


def test_refitter_refuses_bound_tensors_changed_behind_its_back() -> None:
    """A `.data` swap to another dtype is refused, not cast silently; a swap to other memory
    is refused too (a captured graph would read the old memory)."""
    a, b = torch.nn.Linear(4, 4).eval(), torch.nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, b)
    refitter()
    before = compiled(x)
    b.weight.data = b.weight.data.double()
    with pytest.raises(torchrefit.WeightDtypeError, match="weight"):
        refitter()
    b.weight.data = torch.randn(4, 4)
    with pytest.raises(torchrefit.TorchRefitError, match="other memory"):
        refitter()
    assert torch.equal(compiled(x), before)
    torchrefit.Refitter(compiled, b)()  # a new one binds the new tensor
    assert_matches(compiled(x), run_eager(b, x))
