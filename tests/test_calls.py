"""Calls as people write them: bound like the model's forward, errors in the user's terms,
dynamic ranges checked, argument names never structure."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import torchrefit
from torchrefit.fingerprint import source_fingerprint

from helpers import assert_matches, run_eager


class Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, scale=2.0, mask=None):
        y = self.fc(x) * scale
        return y if mask is None else y * mask


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask):
        return self.fc(input_ids) * attention_mask


class Renamed(torch.nn.Module):
    """Wraps a model; only the argument names of its forward differ."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens, weights):
        return self.inner(tokens, weights)


class Wrapped(Renamed):
    def forward(self, input_ids, attention_mask):  # type: ignore[override]
        return self.inner(input_ids, attention_mask)


def test_keyword_positional_and_defaults_bind_as_forward_does() -> None:
    model = Scaled().eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(model, (x,), backend="eager")
    expected = run_eager(model, x)
    for args, kwargs in (
        ((x,), {}),
        ((), {"x": x}),
        ((x, 2.0), {}),  # the default, given: what was compiled
        ((x,), {"scale": 2.0, "mask": None}),
    ):
        assert_matches(compiled(*args, **kwargs), expected)
    with pytest.raises(torchrefit.InputError, match=r"'scale'.*default 2\.0.*3\.0"):
        compiled(x, 3.0)
    with pytest.raises(torchrefit.InputError, match=r"'mask'.*example inputs"):
        compiled(x, mask=torch.ones(2, 4))
    with pytest.raises(torchrefit.InputError, match=r"forward\(x, scale=2\.0, mask=None\).*'x'"):
        compiled()
    with pytest.raises(torchrefit.InputError, match="unexpected keyword argument 'y'"):
        compiled(x, y=1)


def test_compiled_by_keyword_called_positionally() -> None:
    model = TwoInputs().eval()
    ids, mask = torch.randn(2, 4), torch.rand(2, 4)
    compiled = torchrefit.compile(
        model, (), {"input_ids": ids, "attention_mask": mask}, backend="eager"
    )
    expected = run_eager(model, ids, mask)
    assert_matches(compiled(ids, mask), expected)
    assert_matches(compiled(ids, attention_mask=mask), expected)
    assert_matches(compiled(attention_mask=mask, input_ids=ids), expected)


def test_errors_name_the_argument_and_what_was_expected(tmp_path) -> None:
    model = TwoInputs().eval()
    ids, mask = torch.randn(2, 4), torch.rand(2, 4)
    compiled = torchrefit.compile(model, (ids, mask), backend="eager")
    with pytest.raises(
        torchrefit.InputError, match=r"'attention_mask' has shape \[3, 4\].*\[2, 4\]"
    ):
        compiled(ids, torch.rand(3, 4))
    with pytest.raises(torchrefit.InputError, match=r"'input_ids' has dtype torch\.float64"):
        compiled(input_ids=ids.double(), attention_mask=mask)
    with pytest.raises(torchrefit.InputError, match=r"'attention_mask' is a list of 1.*one value"):
        compiled(ids, [mask])
    path = str(tmp_path / "m.trf")
    torchrefit.save(compiled, path)
    loaded = torchrefit.load(path)  # the signature travels in the file
    assert_matches(loaded(attention_mask=mask, input_ids=ids), run_eager(model, ids, mask))
    with pytest.raises(torchrefit.InputError, match="'attention_mask'"):
        loaded(ids, torch.rand(2, 5))


def test_an_exported_program_binds_by_its_recorded_names() -> None:
    model = TwoInputs().eval()
    ids, mask = torch.randn(2, 4), torch.rand(2, 4)
    program = torch.export.export(model, (ids, mask))
    compiled = torchrefit.compile(program, (ids, mask), backend="eager")
    assert_matches(compiled(ids, attention_mask=mask), run_eager(model, ids, mask))
    with pytest.raises(torchrefit.InputError, match="'input_ids'"):
        compiled(ids.double(), mask)


def test_dynamic_ranges_are_checked_at_call_time(tmp_path) -> None:
    model = TwoInputs().eval()
    batch = Dim("batch", min=2, max=8)
    example = (torch.randn(3, 4), torch.rand(3, 4))
    program = torch.export.export(
        model, example, dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}}
    )
    compiled = torchrefit.compile(program, example, backend="eager")
    ids, mask = torch.randn(5, 4), torch.rand(5, 4)
    assert_matches(compiled(ids, mask), run_eager(model, ids, mask))
    path = str(tmp_path / "d.trf")
    torchrefit.save(compiled, path)
    for module in (compiled, torchrefit.load(path)):
        with pytest.raises(
            torchrefit.InputError, match=r"'input_ids' has size 9 in dimension 0.*2 to 8"
        ):
            module(torch.randn(9, 4), torch.rand(9, 4))
        with pytest.raises(torchrefit.InputError, match=r"'attention_mask' has size 6.*equal"):
            module(torch.randn(5, 4), torch.rand(6, 4))
    guard = torchrefit.load(path)._torchrefit.guards[0]
    assert guard.example_size() == [3, 4] and guard.dynamic[0].max == 8


def test_mutable_module_compiles_one_variant_for_both_call_forms() -> None:
    model = Scaled().eval()
    mutable = torchrefit.MutableModule(model, backend="eager")
    x = torch.randn(2, 4)
    expected = run_eager(model, x)
    assert_matches(mutable(x), expected)
    assert_matches(mutable(x=x), expected)
    assert mutable.compiles == 1
    with pytest.raises(torchrefit.InputError, match="unexpected keyword argument 'z'"):
        mutable(x, z=1)


def test_argument_names_are_not_structure_and_refit_on_the_fast_path(monkeypatch) -> None:
    """The same model behind forwards with other argument names, exported with a dynamic
    dimension (whose symbols torch.export derives from the names): one fingerprint."""
    inner = TwoInputs().eval()
    example = (torch.randn(3, 4), torch.rand(3, 4))

    def export(wrapper: torch.nn.Module, names: tuple[str, str]) -> torch.export.ExportedProgram:
        batch = Dim("batch", max=16)
        shapes = {n: {0: batch} for n in names}
        return torch.export.export(wrapper, example, dynamic_shapes=shapes)

    a = export(Renamed(inner), ("tokens", "weights"))
    new_inner = TwoInputs().eval()
    b = export(Wrapped(new_inner), ("input_ids", "attention_mask"))
    key = torchrefit.Settings(backend="eager").engine_key()
    assert source_fingerprint(a, key) == source_fingerprint(b, key)
    compiled = torchrefit.compile(a, example, backend="eager")
    import torchrefit.refit.match as match

    monkeypatch.setattr(match, "slow", lambda *a, **k: pytest.fail("took the slow path"))
    refitted = torchrefit.refit_module_weights(compiled, b)
    ids, mask = torch.randn(5, 4), torch.rand(5, 4)
    assert_matches(refitted(ids, mask), run_eager(new_inner, ids, mask))
    assert_matches(refitted(tokens=ids, weights=mask), run_eager(new_inner, ids, mask))
