"""Refit from a safetensors file in bounded chunks, never the whole file in memory."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import torchrefit
import torchrefit.refit.evaluate as evaluate
import torchrefit.refit.files as files
import torchrefit.refit.transfer as transfer

from cases import CASES
from helpers import assert_differs, assert_matches, run_eager


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 1000)  # many chunks, none aligned to a weight
    read_tensor = files.read_tensor

    def one_tensor(t):
        assert t.end - t.begin <= 4096, "a large weight was read whole into memory"
        return read_tensor(t)

    monkeypatch.setattr(evaluate, "read_tensor", one_tensor)


def _file(tmp_path, model, name="w.safetensors"):
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("name", ["mlp", "bert", "conv_bn_folded"])
def test_streamed_refit_matches_eager(small_chunks, tmp_path, name: str) -> None:
    case = CASES[name]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), backend="eager", **case.settings)
    refitted = torchrefit.refit_module_weights(compiled, _file(tmp_path, b))
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))
    assert_differs(refitted(*x), run_eager(a, *x))
    assert_matches(compiled(*x), run_eager(a, *x))


def test_streamed_cast_checks_overflow_before_writing(small_chunks, tmp_path) -> None:
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), backend="eager", dtype="float16")
    torchrefit.refit_module_weights(compiled, _file(tmp_path, b), in_place=True)
    x = case.inputs()
    assert_matches(compiled(*x), run_eager(copy.deepcopy(b).half(), x[0].half()))
    before = compiled(*x)
    with torch.no_grad():
        b.fc3.weight[-1, -1] = 1e6  # the last value of the last weight
    with pytest.raises(torchrefit.WeightValueError, match="fc3.weight"):
        torchrefit.refit_module_weights(
            compiled, _file(tmp_path, b, "big.safetensors"), in_place=True
        )
    assert torch.equal(compiled(*x), before)


def _failing_reads(monkeypatch, at: int) -> list[int]:
    """File reads (`_read_range` calls) fail from the `at`-th on."""
    real = transfer._read_range
    calls: list[int] = []

    def failing(*args):
        calls.append(1)
        if len(calls) >= at:
            raise OSError("the disk went away")
        return real(*args)

    monkeypatch.setattr(transfer, "_read_range", failing)
    return calls


def test_a_read_failure_midway_changes_nothing(small_chunks, tmp_path, monkeypatch) -> None:
    """The file is read into the staging area before anything is written: a read that
    fails midway leaves the module computing what it did."""
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), backend="eager")
    path = _file(tmp_path, b)
    x = case.inputs()
    before = compiled(*x)
    _failing_reads(monkeypatch, 3)
    with pytest.raises(OSError):
        torchrefit.refit_module_weights(compiled, path, in_place=True)
    assert torch.equal(compiled(*x), before)
    monkeypatch.undo()
    torchrefit.refit_module_weights(compiled, path, in_place=True)
    assert_matches(compiled(*x), run_eager(b, *x))


def test_a_read_failure_in_a_second_pass_leaves_a_module_that_refuses_to_run(
    tmp_path, monkeypatch
) -> None:
    """A file larger than the staging area is read twice; a failure while the second pass
    writes leaves the weights it may have reached unset, never a mix that runs."""
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), backend="eager", staging_bytes=1 << 20)
    monkeypatch.setattr(transfer.Transfer, "staging_bytes", lambda self: 512)  # many batches
    path = _file(tmp_path, b)
    second = transfer.Transfer._second_pass

    def failing_second_pass(self) -> None:
        _failing_reads(monkeypatch, 2)
        second(self)

    monkeypatch.setattr(transfer.Transfer, "_second_pass", failing_second_pass)
    with pytest.raises(OSError):
        torchrefit.refit_module_weights(compiled, path, in_place=True)
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        compiled(*case.inputs())
    monkeypatch.undo()
    torchrefit.refit_module_weights(compiled, path, in_place=True)
    x = case.inputs()
    assert_matches(compiled(*x), run_eager(b, *x))


def test_a_file_missing_a_weight_changes_nothing(small_chunks, tmp_path) -> None:
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    compiled = torchrefit.compile(a, case.inputs(), backend="eager")
    path = str(tmp_path / "partial.safetensors")
    save_file({k: v for k, v in b.state_dict().items() if k != "fc2.bias"}, path)
    x = case.inputs()
    before = compiled(*x)
    with pytest.raises(torchrefit.MissingWeightError, match="fc2.bias"):
        torchrefit.refit_module_weights(compiled, path, in_place=True)
    assert torch.equal(compiled(*x), before)
