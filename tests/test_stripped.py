"""Weight-stripped files: engines shipped once, weights supplied at load; never garbage."""

from __future__ import annotations

import os

import pytest

import torchrefit

from cases import CASES
from helpers import assert_matches, run_eager


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    case = CASES["bert"]
    a = case.build(0)
    compiled = torchrefit.compile(a, case.inputs(), backend="eager")
    root = tmp_path_factory.mktemp("stripped")
    full, stripped = str(root / "full.trf"), str(root / "stripped.trf")
    torchrefit.save(compiled, full)
    torchrefit.save(compiled, stripped, include_weights=False)
    return case, full, stripped


def test_stripped_file_is_small(bert_files) -> None:
    _, full, stripped = bert_files
    assert os.path.getsize(stripped) < os.path.getsize(full) / 2


def test_stripped_module_refuses_to_run_until_refitted(bert_files) -> None:
    case, _, stripped = bert_files
    module = torchrefit.load(stripped)
    with pytest.raises(torchrefit.WeightsNotLoadedError, match="weights="):
        module(*case.inputs())
    b = case.build(1)
    with pytest.raises(torchrefit.MissingWeightError):
        partial = {k: v for k, v in b.state_dict().items() if "pooler" not in k}
        torchrefit.refit_module_weights(module, partial, in_place=True)
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        module(*case.inputs())
    with pytest.raises(torchrefit.SerializationError, match="include_weights=False"):
        torchrefit.save(module, stripped + ".again")
    torchrefit.refit_module_weights(module, b.state_dict(), in_place=True)
    x = case.inputs()
    assert_matches(module(*x), run_eager(b, *x))


@pytest.mark.parametrize("form", ["state_dict", "safetensors"])
def test_load_with_weights(bert_files, tmp_path, form: str) -> None:
    from safetensors.torch import save_file

    case, _, stripped = bert_files
    b = case.build(2)
    weights = b.state_dict()  # lacks BERT's non-persistent buffers: the file keeps them
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "w.safetensors"))
        weights = str(tmp_path / "w.safetensors")
    module = torchrefit.load(stripped, weights=weights)
    x = case.inputs()
    assert_matches(module(*x), run_eager(b, *x))


def test_refitter_fills_a_stripped_module(bert_files) -> None:
    case, _, stripped = bert_files
    module = torchrefit.load(stripped)
    b = case.build(3)
    torchrefit.Refitter(module, b)()
    x = case.inputs()
    assert_matches(module(*x), run_eager(b, *x))
