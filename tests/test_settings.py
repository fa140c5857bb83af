from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import torchrefit
from torchrefit.settings import Settings, settings_table


def test_settings_are_frozen_and_replaced() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.min_block_size = 3  # type: ignore[misc]
    assert dataclasses.replace(s, min_block_size=3).min_block_size == 3


def test_unknown_setting_names_the_fields() -> None:
    with pytest.raises(torchrefit.SettingsError, match="min_block_size"):
        Settings.from_overrides(min_blok_size=2)


@pytest.mark.parametrize(
    "overrides",
    [
        {"backend": "tensorrt"},
        {"dtype": "float8"},
        {"min_block_size": 0},
        {"torch_executed_ops": [3]},
    ],
)
def test_bad_values_are_refused(overrides: dict) -> None:
    with pytest.raises(torchrefit.SettingsError):
        Settings.from_overrides(**overrides)


def test_ops_given_as_overloads_or_names_are_one_thing() -> None:
    by_name = Settings(torch_executed_ops=frozenset({"torch.ops.aten.convolution.default"}))
    by_op = Settings(torch_executed_ops=frozenset({torch.ops.aten.convolution.default}))
    assert by_name == by_op
    assert Settings(dtype=torch.float16).dtype == "float16"


def test_engine_key_feeds_on_engine_fields_only() -> None:
    key = Settings().engine_key()
    assert "backend" in key and "immutable_weights" in key
    assert Settings(dtype="float16").engine_key() != key


def test_json_round_trip() -> None:
    s = Settings(
        min_block_size=2, torch_executed_ops=frozenset({"aten.relu.default"}), dtype="bfloat16"
    )
    assert Settings.from_json(s.to_json()) == s


def test_table_lists_every_field() -> None:
    table = settings_table()
    for f in dataclasses.fields(Settings):
        assert f"`{f.name}`" in table


def test_torch_devices_and_dtypes_are_accepted_and_bad_values_refused_before_compiling() -> None:
    settings = Settings(device=torch.device("cpu"), dtype=torch.float16)
    assert settings.device == "cpu" and settings.dtype == "float16"
    for bad, field in (
        ({"device": "gpu7"}, "device"),
        ({"device": 3.5}, "device"),
        ({"cache_max_bytes": 0}, "cache_max_bytes"),
        ({"cuda_graphs": "yes"}, "cuda_graphs"),
        ({"double_buffer": 1}, "double_buffer"),
        ({"inductor_options": 5}, "inductor_options"),
        ({"cache_dir": 7}, "cache_dir"),
    ):
        with pytest.raises(torchrefit.SettingsError, match=f"Settings.{field}"):
            Settings(**bad)


def test_a_torch_device_setting_compiles(monkeypatch) -> None:
    model = torch.nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(model, (x,), backend="eager", device=torch.device("cpu"))
    assert torch.allclose(compiled(x), model(x))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"backend": None}, "backend"),
        ({"min_block_size": True}, "min_block_size"),
        ({"min_block_size": 2.0}, "min_block_size"),
        ({"torch_executed_ops": 5}, "torch_executed_ops"),
        ({"torch_executed_ops": ["aten.no_such_op"]}, "torch_executed_ops"),
        ({"inductor_options": {"max_autotune": object()}}, r"inductor_options\['max_autotune'\]"),
        ({"inductor_options": {"max_autotun": True}}, "inductor_options"),
        ({"inductor_options": [(3, True)]}, "inductor_options"),
        ({"dtype": torch.float64}, "dtype"),
        ({"cache_max_bytes": 2**40 + 0.5}, "cache_max_bytes"),
        ({"fold_batch_norm": None}, "fold_batch_norm"),
    ],
)
def test_each_field_is_checked_naming_field_and_value(overrides: dict, field: str) -> None:
    with pytest.raises(torchrefit.SettingsError, match=f"Settings.{field}") as caught:
        torchrefit.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), **overrides)
    assert "expected" in str(caught.value)


def test_torch_objects_are_normalized_to_the_strings_files_hold() -> None:
    by_objects = Settings(
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        torch_executed_ops=torch.ops.aten.addmm.default,  # one op, not in a set
        inductor_options={"fallback_random": True, "max_autotune_gemm_backends": "ATEN"},
    )
    by_strings = Settings(
        device="cpu",
        dtype="torch.bfloat16",
        torch_executed_ops=["aten.addmm.default"],
        inductor_options=[("max_autotune_gemm_backends", "ATEN"), ("fallback_random", True)],
    )
    assert by_objects == by_strings
    assert by_objects.dtype == "bfloat16" and by_objects.torch_executed_ops == {
        "aten.addmm.default"
    }
    assert Settings.from_json(json.loads(json.dumps(by_objects.to_json()))) == by_objects


@pytest.mark.parametrize(
    "value", ["x -wrapper /bin/sh", "-fplugin=evil.so", ["native", "-wrapper"], "a\tb"]
)
def test_compiler_options_take_one_plain_token(value) -> None:
    with pytest.raises(torchrefit.SettingsError, match="command line"):
        torchrefit.Settings(inductor_options={"cpp.march": value})
    assert torchrefit.Settings(inductor_options={"cpp.march": "x86-64-v3"}).inductor_options


def test_a_file_never_turns_a_check_off(tmp_path) -> None:
    """check_finite=False and a huge staging area saved in a file are the saver's; a loaded
    module checks and stages with the defaults."""
    model = torch.nn.Linear(4, 4).eval()
    compiled = torchrefit.compile(
        model, (torch.randn(2, 4),), backend="eager", check_finite=False, staging_bytes=1 << 40
    )
    path = str(tmp_path / "m.trf")
    torchrefit.save(compiled, path)
    loaded = torchrefit.load(path)
    assert loaded.settings.check_finite is True
    assert loaded.settings.staging_bytes == torchrefit.Settings().staging_bytes
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["weight"][0, 0] = float("nan")
    with pytest.raises(torchrefit.WeightValueError):
        torchrefit.refit_module_weights(loaded, bad, in_place=True)
