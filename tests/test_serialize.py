"""save / load: one zip of JSON metadata, safetensors weights and hash-checked engines."""

from __future__ import annotations

import copy
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

import torchrefit
from torchrefit import CompiledModule, SerializationError

import models
from helpers import assert_differs, assert_matches, rewrite_zip, run_eager


def leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def assert_equal_outputs(actual: Any, expected: Any) -> None:
    got, want = leaves(actual), leaves(expected)
    assert len(got) == len(want) > 0
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"output {i} differs"


def saved_and_loaded(module: CompiledModule, path: Path) -> CompiledModule:
    torchrefit.save(module, str(path))
    loaded = torchrefit.load(str(path))
    assert isinstance(loaded, CompiledModule)
    return loaded


def _images() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 8, 8),)


FALLBACKS = {"torch_executed_ops": {"torch.ops.aten.convolution.default"}}
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]], dict]] = {
    "mlp": (models.MLP, lambda: (torch.randn(4, 16),), {}),
    "conv_bn_folded": (models.ConvBNWithRunningStats, _images, {"fold_batch_norm": True}),
    "conv_net_fallbacks": (models.ConvNet, _images, FALLBACKS),
    "lifted_constant": (models.LiftedScalarConstant, lambda: (torch.randn(4, 8),), {}),
    "tied_embeddings": (models.TiedEmbeddings, lambda: (torch.randint(0, 20, (4, 5)),), {}),
}


class Compiled:
    """A case's models A, B, C, D and module compiled with A (eager backend)."""

    def __init__(self, name: str) -> None:
        make, self.inputs, settings = CASES[name]
        self.weights = [models.randomize(make(), seed) for seed in range(4)]
        self.module = torchrefit.compile(
            self.weights[0], self.inputs(), backend="eager", **settings
        )


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request) -> Compiled:
    """Shared by the tests of a case: they refit loaded copies of it, or it not in place."""
    return Compiled(request.param)


def test_save_load_gives_equal_outputs(compiled, tmp_path):
    loaded = saved_and_loaded(compiled.module, tmp_path / "m.trf")
    assert loaded.settings == compiled.module.settings
    assert sorted(loaded.engines()) == sorted(compiled.module.engines())
    assert sorted(loaded.fallbacks()) == sorted(compiled.module.fallbacks())
    inputs = compiled.inputs()
    assert_equal_outputs(run_eager(loaded, *inputs), run_eager(compiled.module, *inputs))


def _with_state(model: nn.Module, source: nn.Module) -> nn.Module:
    """`model` with `source`'s state_dict: lifted constants stay `model`'s, as in a refit."""
    result = copy.deepcopy(model)
    result.load_state_dict(source.state_dict())
    return result


@pytest.mark.parametrize("form", ["module", "state_dict", "exported_program_slow_path"])
def test_load_then_refit_matches_eager_of_new_weights(compiled, form, tmp_path):
    loaded = saved_and_loaded(compiled.module, tmp_path / "m.trf")
    model_a, model_b = compiled.weights[:2]
    kwargs: dict[str, Any] = {}
    reference = model_b
    if form == "module":
        new_weights: Any = model_b
    elif form == "state_dict":
        new_weights = dict(model_b.state_dict())
        reference = _with_state(model_a, model_b)
    else:
        new_weights = torch.export.export(model_b, compiled.inputs())
        kwargs = {"use_weight_map_cache": False, "arg_inputs": compiled.inputs()}
    refitted = torchrefit.refit_module_weights(loaded, new_weights, **kwargs)
    inputs = compiled.inputs()
    assert_matches(run_eager(refitted, *inputs), run_eager(reference, *inputs))
    assert_differs(run_eager(refitted, *inputs), run_eager(model_a, *inputs))


@pytest.mark.parametrize("in_place", [False, True])
def test_loaded_module_refits_three_times(compiled, in_place, tmp_path):
    module = saved_and_loaded(compiled.module, tmp_path / "m.trf")
    previous = compiled.weights[0]
    for weights in compiled.weights[1:]:
        module = torchrefit.refit_module_weights(module, weights, in_place=in_place)
        inputs = compiled.inputs()
        assert_matches(run_eager(module, *inputs), run_eager(weights, *inputs))
        assert_differs(run_eager(module, *inputs), run_eager(previous, *inputs))
        previous = weights


def test_save_after_refit_keeps_new_weights(compiled, tmp_path):
    model_b = compiled.weights[1]
    refitted = torchrefit.refit_module_weights(compiled.module, model_b)
    loaded = saved_and_loaded(refitted, tmp_path / "m.trf")
    inputs = compiled.inputs()
    assert_equal_outputs(run_eager(loaded, *inputs), run_eager(refitted, *inputs))
    assert_matches(run_eager(loaded, *inputs), run_eager(model_b, *inputs))


# -- files torchrefit must refuse ----------------------------------------------------------


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "mlp.trf"
    model = models.randomize(models.MLP(), 0)
    torchrefit.save(torchrefit.compile(model, (torch.randn(4, 16),), backend="eager"), str(path))
    return path


def _flip_one_byte(data: bytes) -> bytes:
    """One byte of the middle changed, keeping the JSON of an eager engine parseable."""
    data = bytearray(data)
    i = next(i for i in range(len(data) // 2, len(data)) if chr(data[i]).isalpha())
    data[i] = ord("x") if data[i] != ord("x") else ord("y")
    return bytes(data)


def test_tampered_engine_is_refused(saved_mlp, tmp_path):
    with zipfile.ZipFile(saved_mlp) as archive:
        engines = [n for n in archive.namelist() if n.startswith("engines/") and n.endswith(".bin")]
    assert engines
    target = engines[0]
    tampered = tmp_path / "tampered.trf"
    rewrite_zip(saved_mlp, tampered, lambda n, d: _flip_one_byte(d) if n == target else d)
    with pytest.raises(SerializationError, match="SHA-256") as info:
        torchrefit.load(str(tampered))
    assert target.removeprefix("engines/").removesuffix(".bin") in str(info.value)


def test_untampered_rewrite_still_loads(saved_mlp, tmp_path):
    """The tampering test's rewrite alone changes nothing that load checks."""
    copy = tmp_path / "copy.trf"
    rewrite_zip(saved_mlp, copy, lambda n, d: d)
    x = torch.randn(4, 16)
    assert_equal_outputs(
        run_eager(torchrefit.load(str(copy)), x), run_eager(torchrefit.load(str(saved_mlp)), x)
    )


def test_metadata_version_bump_is_refused(saved_mlp, tmp_path):
    def bump(name: str, data: bytes) -> bytes:
        if name != "metadata.json":
            return data
        metadata = json.loads(data)
        metadata["version"] += 1
        return json.dumps(metadata).encode()

    bumped = tmp_path / "bumped.trf"
    rewrite_zip(saved_mlp, bumped, bump)
    with pytest.raises(SerializationError, match="version"):
        torchrefit.load(str(bumped))


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a zip file\x00\x01\x02" * 10)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _torch_save(path: Path) -> None:
    """torch.save writes a zip too, but of pickles: it must be refused before any unpickling."""
    torch.save({"fc1.weight": torch.randn(2, 2)}, str(path))


@pytest.mark.parametrize(
    "write", [_garbage, _empty, _torch_save], ids=["garbage", "empty", "torch_save"]
)
def test_file_that_is_not_torchrefit_is_refused(write, tmp_path, unpickling_calls):
    path = tmp_path / "model.trf"
    write(path)
    with pytest.raises(SerializationError):
        torchrefit.load(str(path))
    assert unpickling_calls == []


def _weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[str, bytes], bytes]:
    def rewrite(name: str, data: bytes) -> bytes:
        if name != "weights.safetensors":
            return data
        tensors = safetensors_load(data)
        change(tensors)
        return safetensors_save(tensors)

    return rewrite


def _drop(member: str) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: None if name == member else data


MALFORMED: dict[str, tuple[Callable[[str, bytes], bytes | None], str]] = {
    "no_weights_member": (_drop("weights.safetensors"), "weights.safetensors"),
    "no_engine_member": (_drop("engines/_engine_0.bin"), "_engine_0"),
    "truncated_weights": (
        lambda n, d: d[: len(d) // 2] if n == "weights.safetensors" else d,
        "weights",
    ),
    "weight_missing": (_weights(lambda t: t.pop("fc2.bias")), "fc2.bias"),
    "weight_of_another_shape": (
        _weights(lambda t: t.update({"fc2.bias": t["fc2.bias"][:1].clone()})),
        "fc2.bias",
    ),
    "weight_of_another_dtype": (
        _weights(lambda t: t.update({"fc2.weight": t["fc2.weight"].half()})),
        "fc2.weight",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_members_are_refused(case, saved_mlp, tmp_path):
    """Weights are data read without trust: ones unlike the metadata's must not load."""
    change, named = MALFORMED[case]
    broken = tmp_path / "broken.trf"
    rewrite_zip(saved_mlp, broken, change)
    with pytest.raises(SerializationError) as info:
        torchrefit.load(str(broken))
    assert named in str(info.value)


@pytest.mark.parametrize(
    "member", ["metadata.json", "weights.safetensors", "engines/_engine_0.bin"]
)
def test_a_corrupted_member_fails_its_checksum(member, saved_mlp, tmp_path):
    """A flipped byte anywhere (even one that leaves the file parseable) is caught."""

    def flip(name: str, data: bytes) -> bytes:
        if name != member:
            return data
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]

    broken = tmp_path / "broken.trf"
    rewrite_zip(saved_mlp, broken, flip, checksums=False)
    with pytest.raises(SerializationError, match="SHA-256"):
        torchrefit.load(str(broken))


# -- loading runs no pickle ---------------------------------------------------------------


def test_load_never_unpickles(compiled, tmp_path, unpickling_calls):
    """Eager engines are JSON graphs, so nothing in the file needs unpickling."""
    path = tmp_path / "m.trf"
    torchrefit.save(compiled.module, str(path))
    loaded = torchrefit.load(str(path))
    inputs = compiled.inputs()
    assert_equal_outputs(run_eager(loaded, *inputs), run_eager(compiled.module, *inputs))
    assert unpickling_calls == []


# -- fallbacks and a real model ------------------------------------------------------------


def test_fallbacks_survive_save_load_refit(tmp_path):
    model_a, model_b = (models.randomize(models.ConvNet(), seed) for seed in (0, 1))
    compiled_a = torchrefit.compile(model_a, _images(), backend="eager", **FALLBACKS)
    assert compiled_a.fallbacks() and compiled_a.engines()
    loaded = saved_and_loaded(compiled_a, tmp_path / "m.trf")
    assert sorted(loaded.fallbacks()) == sorted(compiled_a.fallbacks())
    assert loaded.settings.torch_executed_ops == {"aten.convolution.default"}
    x = _images()[0]
    assert_equal_outputs(run_eager(loaded, x), run_eager(compiled_a, x))
    refitted = torchrefit.refit_module_weights(loaded, model_b, in_place=True)
    assert_matches(run_eager(refitted, x), run_eager(model_b, x))
    for out, old in zip(leaves(run_eager(refitted, x)), leaves(run_eager(model_a, x)), strict=True):
        assert_differs(out, old)


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, CompiledModule]:
    model = models.bert(0)
    return model, torchrefit.compile(model, (torch.randint(0, 64, (2, 8)),), backend="eager")


def test_bert_survives_save_load(bert, tmp_path):
    model, compiled_bert = bert
    loaded = saved_and_loaded(compiled_bert, tmp_path / "bert.trf")
    ids = torch.randint(0, 64, (2, 8))
    got, want = run_eager(loaded, ids), run_eager(model, ids)
    assert type(got) is type(want)
    for field in ("last_hidden_state", "pooler_output"):
        assert_matches(getattr(got, field), getattr(want, field))
    assert_equal_outputs(got, run_eager(compiled_bert, ids))


def test_bert_refits_after_load(bert, tmp_path):
    model_a, compiled_bert = bert
    loaded = saved_and_loaded(compiled_bert, tmp_path / "bert.trf")
    model_b = models.bert(1)
    refitted = torchrefit.refit_module_weights(loaded, model_b)
    ids = torch.randint(0, 64, (2, 8))
    got = run_eager(refitted, ids)
    assert_matches(got, run_eager(model_b, ids))
    for field in ("last_hidden_state", "pooler_output"):
        assert_differs(getattr(got, field), getattr(run_eager(model_a, ids), field))
