"""Hostile weight sources and file paths: typed errors, bounded reads, never a hang.

A header or index nested too deep for the JSON parser, an index that is a link to /dev/zero,
and a FIFO where a file should be (the single file, the index, a shard, a torchrefit file):
each is refused with a TorchRefitError before anything is read from it."""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import torchrefit
from torchrefit.cli import main

from models import MLP, randomize

DEEP = 100_000


@pytest.fixture(scope="module")
def mlp() -> torchrefit.CompiledModule:
    return torchrefit.compile(randomize(MLP(), 0), (torch.randn(4, 16),), backend="eager")


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = {k: v.contiguous() for k, v in randomize(MLP(), 1).state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"))
    return weights


def _index(directory: Path, text: str) -> Path:
    _weights(directory)
    index = directory / "model.safetensors.index.json"
    index.write_text(text)
    return index


def _refit(mlp: torchrefit.CompiledModule, source: Any) -> None:
    torchrefit.refit_module_weights(mlp, str(source), in_place=False)


def test_a_header_nested_too_deep_is_refused_typed(mlp, tmp_path) -> None:
    header = ('{"a": ' + "[" * DEEP + "]" * DEEP + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="too deep"):
        _refit(mlp, path)


def test_an_index_nested_too_deep_is_refused_typed(mlp, tmp_path) -> None:
    index = _index(tmp_path, '{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="too deep"):
        _refit(mlp, index)
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="too deep"):
        _refit(mlp, tmp_path)  # the directory holding it


def test_an_index_linking_to_dev_zero_is_refused_without_reading(mlp, tmp_path) -> None:
    _weights(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.symlink_to("/dev/zero")
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="character device"):
        _refit(mlp, index)
    single = tmp_path / "zero.safetensors"
    single.symlink_to("/dev/zero")
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="character device"):
        _refit(mlp, single)


def _never_blocks(fifo: Path, call: Callable[[], Any]) -> BaseException | None:
    """Run `call` on a thread; if it still waits on the FIFO after a while, open the FIFO's
    writing end (which ends the wait) and fail."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - judged by the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=30)
        pytest.fail(f"reading {fifo} waited for a writer")
    return outcome[0]


@pytest.mark.parametrize("where", ["single file", "index", "shard", "directory's file"])
def test_a_fifo_is_refused_never_waited_on(mlp, tmp_path, where: str) -> None:
    if where == "single file":
        fifo = source = tmp_path / "w.safetensors"
    elif where == "index":
        _weights(tmp_path)
        fifo = source = tmp_path / "model.safetensors.index.json"
    elif where == "shard":
        weights = _weights(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        fifo = tmp_path / "model.safetensors"
        source = tmp_path / "model.safetensors.index.json"
        source.write_text(json.dumps({"weight_map": dict.fromkeys(weights, fifo.name)}))
    else:
        fifo, source = tmp_path / "model.safetensors", tmp_path
    os.mkfifo(fifo)
    error = _never_blocks(fifo, lambda: _refit(mlp, source))
    assert isinstance(error, torchrefit.TorchRefitError), error
    assert "FIFO" in str(error) and str(fifo.name) in str(error)


def test_a_fifo_as_a_torchrefit_file_is_refused_never_waited_on(tmp_path) -> None:
    fifo = tmp_path / "model.trf"
    os.mkfifo(fifo)
    error = _never_blocks(fifo, lambda: torchrefit.load(str(fifo)))
    assert isinstance(error, torchrefit.SerializationError) and "FIFO" in str(error), error
    assert _never_blocks(fifo, lambda: main(["inspect", str(fifo)])) is None


def test_an_index_larger_than_its_bound_is_refused_before_reading(mlp, tmp_path, monkeypatch):
    from torchrefit.refit import shards

    index = _index(tmp_path, json.dumps({"weight_map": {}}) + " " * 4096)
    monkeypatch.setattr(shards, "MAX_INDEX_BYTES", 1024)
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="larger than 1024 bytes"):
        _refit(mlp, index)
