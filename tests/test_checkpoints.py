"""Checkpoints as people ship them: sharded by save_pretrained, in every safetensors dtype,
and malformed in each way the safetensors library refuses."""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from collections.abc import Callable

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import torchrefit
import torchrefit.refit.files as files
import torchrefit.refit.transfer as transfer

from cases import CASES
from helpers import assert_differs, assert_matches, run_eager
from models import randomize

MLP = CASES["mlp"]


@pytest.fixture(scope="module")
def mlp() -> torchrefit.CompiledModule:
    """An MLP compiled from weights A; refit it with in_place=False."""
    return torchrefit.compile(MLP.build(0), MLP.inputs(), backend="eager")


def write_raw(path: str, entries: dict[str, tuple[str, list[int], bytes]]) -> str:
    """A safetensors file written byte by byte: name -> (format dtype, shape, bytes), so
    dtypes that safetensors.torch cannot write (F4, F6, F8_E8M0) can be tested too."""
    header, data, offset = {}, b"", 0
    for name, (code, shape, raw) in entries.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return path


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _state(model: nn.Module) -> dict[str, tuple[str, list[int], bytes]]:
    return {k: ("F32", list(v.shape), _bytes(v)) for k, v in model.state_dict().items()}


# -- sharded checkpoints from save_pretrained --------------------------------------------


def _gpt2(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        vocab_size=128,
        n_positions=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return randomize(GPT2LMHeadModel(config), seed)


def _ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, 128, (2, 8)),)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[nn.Module, nn.Module, torchrefit.CompiledModule, str]:
    """(model A, model B, the LM compiled from A, a directory holding B in several shards)."""
    a, b = _gpt2(0), _gpt2(1)
    directory = str(tmp_path_factory.mktemp("gpt2"))
    b.save_pretrained(directory, max_shard_size="200KB", safe_serialization=True)
    compiled = torchrefit.compile(a, _ids(), backend="eager")
    return a, b, compiled, directory


def test_save_pretrained_writes_several_shards(gpt2) -> None:
    _, _, _, directory = gpt2
    shards = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in os.listdir(directory), shards


@pytest.mark.parametrize("where", ["directory", "index"])
def test_refit_from_a_sharded_checkpoint_matches_eager(gpt2, where: str) -> None:
    a, b, compiled, directory = gpt2
    path = (
        directory
        if where == "directory"
        else os.path.join(directory, "model.safetensors.index.json")
    )
    refitted = torchrefit.refit_module_weights(compiled, path)
    x = _ids()
    assert_matches(refitted(*x), run_eager(b, *x))
    assert_differs(refitted(*x), run_eager(a, *x))
    assert_matches(compiled(*x), run_eager(a, *x))


def test_sharded_refit_streams_each_shard_in_chunks(gpt2, monkeypatch) -> None:
    a, b, compiled, directory = gpt2
    monkeypatch.setattr(files, "CHUNK_BYTES", 1000)
    refitted = torchrefit.refit_module_weights(compiled, directory)
    x = _ids()
    assert_matches(refitted(*x), run_eager(b, *x))


def test_a_checkpoint_of_a_wrapping_model_refits_its_inner_module(gpt2) -> None:
    """GPT2Model compiled; the LM checkpoint names it `transformer.`: name_map strips that."""
    a, b, _, directory = gpt2
    compiled = torchrefit.compile(a.transformer, _ids(), backend="eager")
    with pytest.raises(torchrefit.UnexpectedWeightError, match="transformer.h.0"):
        torchrefit.refit_module_weights(compiled, directory)
    refitted = torchrefit.refit_module_weights(
        compiled, directory, name_map=lambda n: n.removeprefix("transformer.")
    )
    x = _ids()
    assert_matches(refitted(*x), run_eager(b.transformer, *x))


# -- every dtype of the format -----------------------------------------------------------


def _every_dtype() -> dict[str, tuple[str, list[int], bytes]]:
    """One tensor of each safetensors dtype, F6 and odd-length F4 included (torch has no
    dtype for them)."""
    values = torch.randn(6)
    out = {
        f"extra.{code.lower()}": (code, [6], _bytes(values.to(dtype)))
        for code, dtype in [
            ("F8_E4M3", torch.float8_e4m3fn),
            ("F8_E5M2", torch.float8_e5m2),
            ("F8_E4M3FNUZ", torch.float8_e4m3fnuz),
            ("F8_E5M2FNUZ", torch.float8_e5m2fnuz),
            ("F8_E8M0", torch.float8_e8m0fnu),
            ("C64", torch.complex64),
            ("BOOL", torch.bool),
            ("F64", torch.float64),
            ("BF16", torch.bfloat16),
            ("I16", torch.int16),
        ]
    }
    for code, dtype in [("U16", torch.uint16), ("U32", torch.uint32), ("U64", torch.uint64)]:
        out[f"extra.{code.lower()}"] = (code, [2, 3], _bytes(torch.arange(6).to(dtype) * 1000))
    out["extra.f4"] = ("F4", [2, 4], bytes(range(4)))  # 8 values, two to a byte
    out["extra.f4_odd"] = ("F4", [2, 3], bytes(3))
    out["extra.f6_e2m3"] = ("F6_E2M3", [4], bytes(3))
    out["extra.f6_e3m2"] = ("F6_E3M2", [4], bytes(3))
    return out


def _drop_extra(name: str) -> str | None:
    return None if name.startswith("extra.") else name


def test_every_safetensors_dtype_is_accepted_when_name_map_drops_it(mlp, tmp_path) -> None:
    b = MLP.build(1)
    path = write_raw(str(tmp_path / "all.safetensors"), {**_every_dtype(), **_state(b)})
    with safe_open(path, framework="pt") as f:  # the library accepts the file as written
        assert len(f.keys()) == len(_every_dtype()) + len(b.state_dict())
    refitted = torchrefit.refit_module_weights(mlp, path, name_map=_drop_extra)
    x = MLP.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))


def test_every_torch_dtype_of_the_format_reads_back_bit_for_bit(tmp_path) -> None:
    entries = _every_dtype()
    path = write_raw(str(tmp_path / "all.safetensors"), entries)
    header = files.read_header(path)
    assert set(header.untyped) == {"extra.f4_odd", "extra.f6_e2m3", "extra.f6_e3m2"}
    assert header.untyped["extra.f6_e2m3"].dtype == "F6_E2M3"
    assert header.tensors["extra.f4"].dtype == torch.float4_e2m1fn_x2
    assert header.tensors["extra.f4"].shape == (2, 2)  # torch's packed shape
    assert header.tensors["extra.u64"].dtype == torch.uint64
    for name, t in header.tensors.items():
        assert files.read_tensor(t).view(torch.uint8).numpy().tobytes() == entries[name][2], name


def test_a_dtype_torch_lacks_is_refused_by_name_unless_dropped(mlp, tmp_path) -> None:
    b = MLP.build(1)
    f6 = {"extra.f6_e3m2": ("F6_E3M2", [4], bytes(3))}
    path = write_raw(str(tmp_path / "f6.safetensors"), {**_state(b), **f6})
    with pytest.raises(torchrefit.WeightDtypeError, match=r"'extra\.f6_e3m2'.*F6_E3M2"):
        torchrefit.refit_module_weights(mlp, path)
    used = write_raw(
        str(tmp_path / "used.safetensors"), {**_state(b), "fc1.bias": ("F6_E2M3", [32], bytes(24))}
    )
    with pytest.raises(torchrefit.WeightDtypeError, match=r"'fc1\.bias'.*F6_E2M3"):
        torchrefit.refit_module_weights(mlp, used)


class Float8Linear(nn.Module):
    """A float8 (or e8m0) weight that the model casts itself (`w.to(x.dtype)`: the refit reads
    it whole for the weight program), a float32 bias and a uint16 buffer."""

    def __init__(self, dtype: torch.dtype = torch.float8_e4m3fn, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(
            (torch.randn(64, 64, generator=gen) * 0.5).to(dtype), requires_grad=False
        )
        self.b = nn.Parameter(torch.randn(64, generator=gen))
        self.register_buffer("u", (torch.arange(64) * (seed + 1)).to(torch.uint16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.to(x.dtype) + self.b + self.u.to(x.dtype)


def _f8_file(path: str, model: nn.Module) -> str:
    return write_raw(
        path,
        {
            "w": (
                "F8_E4M3" if model.w.dtype == torch.float8_e4m3fn else "F8_E8M0",
                list(model.w.shape),
                _bytes(model.w),
            ),
            "b": ("F32", [64], _bytes(model.b)),
            "u": ("U16", [64], _bytes(model.u)),
        },
    )


@pytest.mark.parametrize(
    "settings",
    [{}, {"dtype": "float32"}, {"dtype": "bfloat16"}],
    ids=["float8", "float32", "bfloat16"],
)
def test_a_float8_weight_refits_into_a_wider_engine(tmp_path, monkeypatch, settings: dict) -> None:
    """float8 bytes read for the weight program that casts them, into a float8, float32 or
    bfloat16 engine; a uint16 buffer alongside."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 1000)
    a, b = Float8Linear(seed=0).eval(), Float8Linear(seed=1).eval()
    x = (torch.randn(3, 64),)
    compiled = torchrefit.compile(a, x, backend="eager", **settings)
    if settings:
        assert compiled._torchrefit.engine_dtypes["w"] == getattr(torch, settings["dtype"])
    refitted = torchrefit.refit_module_weights(
        compiled, _f8_file(str(tmp_path / "b.safetensors"), b)
    )
    x = (torch.randn(3, 64),)
    reference = b if not settings else copy.deepcopy(b).to(getattr(torch, settings["dtype"]))
    expected = run_eager(
        reference, *(t.to(getattr(torch, settings.get("dtype", "float32"))) for t in x)
    )
    assert_matches(refitted(*x), expected)
    assert_differs(refitted(*x), run_eager(a, *x))


def test_a_float8_e8m0_weight_that_overflows_float16_is_refused_before_writing(
    tmp_path, monkeypatch
) -> None:
    """e8m0 reaches 2**127: the message's peak is found by upcasting (weight read whole)."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 1000)
    a = Float8Linear(torch.float8_e8m0fnu, seed=0).eval()
    compiled = torchrefit.compile(a, (torch.randn(3, 64),), backend="eager", dtype="float16")
    b = Float8Linear(torch.float8_e8m0fnu, seed=1).eval()
    x = (torch.randn(3, 64),)
    refitted = torchrefit.refit_module_weights(
        compiled, _f8_file(str(tmp_path / "b.safetensors"), b), in_place=True
    )
    assert_matches(refitted(*x), run_eager(copy.deepcopy(b).half(), x[0].half()))
    before = compiled(*x)
    with torch.no_grad():
        b.w[-1, -1] = 2.0**20  # beyond float16's 65504, in the last chunk
    with pytest.raises(torchrefit.WeightValueError, match=r"'w'.*1\.049e\+06"):
        torchrefit.refit_module_weights(
            compiled, _f8_file(str(tmp_path / "big.safetensors"), b), in_place=True
        )
    assert torch.equal(compiled(*x), before)


class Float8Table(nn.Module):
    """An embedding table shipped in float8: an engine of a wider dtype holds it cast, and a
    refit streams the float8 bytes into that buffer in chunks."""

    def __init__(self, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.rand(128, 16, generator=gen).to(dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.w)


def _table_file(path: str, model: nn.Module) -> str:
    code = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0"}[model.w.dtype]
    return write_raw(path, {"w": (code, list(model.w.shape), _bytes(model.w))})


def _table_ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, 128, (2, 6)),)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_float8_file_streams_into_a_wider_engine(tmp_path, monkeypatch, dtype) -> None:
    monkeypatch.setattr(files, "CHUNK_BYTES", 100)  # 21 chunks for 2 KB
    a, b = Float8Table(torch.float8_e4m3fn, 0).eval(), Float8Table(torch.float8_e4m3fn, 1).eval()
    compiled = torchrefit.compile(a, _table_ids(), backend="eager", dtype=str(dtype)[6:])
    assert "w" not in compiled._torchrefit.weight_program.inputs  # streamed, not read whole
    path = _table_file(str(tmp_path / "b.safetensors"), b)
    refitted = torchrefit.refit_module_weights(compiled, path)
    ids = _table_ids()
    assert_matches(refitted(*ids), run_eager(copy.deepcopy(b).to(dtype), *ids))
    assert_differs(refitted(*ids), run_eager(copy.deepcopy(a).to(dtype), *ids))


def test_a_streamed_e8m0_weight_that_overflows_float16_is_refused_before_writing(
    tmp_path, monkeypatch
) -> None:
    """The reading pass over streamed weights upcasts each e8m0 chunk to find its peak
    (torch has no abs or max for float8)."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 100)
    a = Float8Table(torch.float8_e8m0fnu, 0).eval()
    b = Float8Table(torch.float8_e8m0fnu, 1).eval()
    compiled = torchrefit.compile(a, _table_ids(), backend="eager", dtype="float16")
    path = _table_file(str(tmp_path / "b.safetensors"), b)
    torchrefit.refit_module_weights(compiled, path, in_place=True)
    ids = _table_ids()
    assert_matches(compiled(*ids), run_eager(copy.deepcopy(b).half(), *ids))
    before = compiled(*ids)
    with torch.no_grad():
        b.w[-1, -1] = 2.0**20  # beyond float16's 65504, in the last chunk
    big = _table_file(str(tmp_path / "big.safetensors"), b)
    with pytest.raises(torchrefit.WeightValueError, match=r"'w'.*1\.049e\+06"):
        torchrefit.refit_module_weights(compiled, big, in_place=True)
    assert torch.equal(compiled(*ids), before)


class ComplexBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("z", torch.randn(4, dtype=torch.complex64))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b + self.z.real


@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # compile's own cast
def test_a_weight_that_cannot_be_cast_into_the_engine_dtype_is_refused_by_name(tmp_path) -> None:
    """A float16 engine holds the complex buffer as float16: a complex file weight would lose
    its imaginary part."""
    model = ComplexBuffer().eval()
    compiled = torchrefit.compile(model, (torch.randn(2, 4),), backend="eager", dtype="float16")
    path = str(tmp_path / "c.safetensors")
    save_file({"z": torch.randn(4, dtype=torch.complex64), "b": torch.randn(4)}, path)
    with pytest.raises(torchrefit.WeightDtypeError, match=r"'z'.*complex64.*float16"):
        torchrefit.refit_module_weights(compiled, path)


@pytest.mark.parametrize(
    "source, target",
    [
        (torch.float8_e4m3fn, torch.float32),
        (torch.float8_e5m2, torch.bfloat16),
        (torch.float8_e8m0fnu, torch.float32),
        (torch.float8_e4m3fn, torch.float8_e4m3fn),
        (torch.uint16, torch.uint16),
        (torch.uint32, torch.uint32),
        (torch.uint64, torch.uint64),
        (torch.uint16, torch.float32),
        (torch.bool, torch.float16),
    ],
    ids=str,
)
def test_chunked_copy_streams_every_dtype_into_its_buffer(
    tmp_path, monkeypatch, source, target
) -> None:
    """The commit stage's file reads: bytes in chunks of 24 bytes (cutting elements of no
    dtype), each cast by copy_ into the engine buffer."""
    monkeypatch.setattr(files, "CHUNK_BYTES", 24)
    values = (
        (torch.randn(50) * 4).abs().to(source)
        if source.is_floating_point
        else (torch.arange(50) * 7 % 5).to(source)
    )
    path = str(tmp_path / "one.safetensors")
    save_file({"t": values}, path) if source != torch.float8_e8m0fnu else write_raw(
        path, {"t": ("F8_E8M0", [50], _bytes(values))}
    )
    t = files.index_safetensors(path)["t"]
    dst = torch.full((50,), 3, dtype=target)
    with open(path, "rb") as f, transfer._Chunks(torch.device("cpu"), source) as chunks:
        transfer._read_range(f, t, 0, dst, chunks)
    assert torch.equal(dst.view(torch.uint8), values.to(target).view(torch.uint8))


_CODES = {
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.float32: "F32",
}


@pytest.mark.parametrize("dtype", list(_CODES), ids=str)
def test_peak_magnitude_of_float8_chunks(tmp_path, monkeypatch, dtype) -> None:
    monkeypatch.setattr(files, "CHUNK_BYTES", 16)
    values = (torch.randn(100) * 10).to(dtype)
    entries = {"t": (_CODES[dtype], [100], _bytes(values))}
    path = write_raw(str(tmp_path / "p.safetensors"), entries)
    scratch = torch.empty(files.buffer_bytes(), dtype=torch.uint8)
    peak = files.peak_magnitude(files.index_safetensors(path)["t"], scratch)
    assert peak == values.float().abs().max().item()


# -- malformed headers: refused typed, naming the file, as the safetensors library does --


def _raw(header: bytes, data: bytes = b"", size: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if size is None else size) + header + data


def _json(header: object, data: bytes = b"") -> bytes:
    return _raw(json.dumps(header).encode(), data)


def _t(dtype: str = "F32", shape: list = [2], offsets: list = [0, 8]) -> dict:  # noqa: B006
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


Z = b"\0" * 8
MALFORMED: dict[str, Callable[[], bytes]] = {
    "shorter_than_8_bytes": lambda: b"\x01\0\0",
    "header_longer_than_file": lambda: _raw(b'{"a":1}', size=1000),
    "header_over_the_size_limit": lambda: _raw(b"{}" + b" " * 100_000_001),
    "header_not_utf8": lambda: _raw(
        b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', Z
    ),
    "header_not_json": lambda: _raw(b'{"a": ', Z),
    "header_not_an_object": lambda: _json([1, 2]),
    "trailing_characters_after_json": lambda: _raw(
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}xx', Z
    ),
    "float_offsets": lambda: _json({"a": _t(offsets=[0.0, 8.0])}, Z),
    "string_offsets": lambda: _json({"a": _t(offsets=["0", "8"])}, Z),
    "three_offsets": lambda: _json({"a": _t(offsets=[0, 8, 8])}, Z),
    "float_dims": lambda: _json({"a": _t(shape=[2.0])}, Z),
    "string_dims": lambda: _json({"a": _t(shape=["2"])}, Z),
    "boolean_dims": lambda: _raw(
        b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', Z[:4]
    ),
    "negative_dims": lambda: _json({"a": _t(shape=[-2, -1])}, Z),
    "nan_dims": lambda: _raw(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', Z),
    "overlapping_tensors": lambda: _json({"a": _t(), "b": _t(offsets=[4, 12])}, Z + Z[:4]),
    "two_tensors_one_range": lambda: _json({"a": _t(), "b": _t()}, Z),
    "gap_between_tensors": lambda: _json({"a": _t(), "b": _t(offsets=[12, 20])}, Z * 3),
    "first_tensor_not_at_zero": lambda: _json({"a": _t(offsets=[4, 12])}, Z + Z[:4]),
    "trailing_bytes_after_data": lambda: _json({"a": _t()}, Z + Z[:4]),
    "data_past_the_end": lambda: _json({"a": _t()}, Z[:4]),
    "length_not_numel_times_itemsize": lambda: _json({"a": _t(offsets=[0, 12])}, Z + Z[:4]),
    "end_before_begin": lambda: _json({"a": _t(shape=[0], offsets=[8, 0])}, Z),
    "numel_overflows": lambda: _json({"a": _t(shape=[2**32, 2**32, 2], offsets=[0, 0])}),
    "unknown_dtype": lambda: _json({"a": _t(dtype="F128")}, Z),
    "lowercase_dtype": lambda: _json({"a": _t(dtype="f32")}, Z),
    "missing_dtype": lambda: _json({"a": {"shape": [2], "data_offsets": [0, 8]}}, Z),
    "metadata_not_str_to_str": lambda: _json({"a": _t(), "__metadata__": {"k": 1}}, Z),
    "metadata_a_tensor": lambda: _json({"__metadata__": _t()}, Z),
    "tensor_entry_null": lambda: _json({"a": None}),
    "sub_byte_tensor_ends_mid_byte": lambda: _json(
        {"a": _t(dtype="F4", shape=[3], offsets=[0, 2])}, Z[:2]
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_file_is_refused_typed_naming_it(mlp, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(MALFORMED[name]())
    with pytest.raises(SafetensorError):  # we agree with the library
        safe_open(str(path), framework="pt")
    with pytest.raises(torchrefit.IncompatibleWeightsError, match=re.escape(path.name)):
        torchrefit.refit_module_weights(mlp, str(path))


# -- the index file is data ----------------------------------------------------------------


def _sharded(
    directory,
    model: nn.Module,
    index: dict | None = None,
    name: str = "model.safetensors.index.json",
) -> str:
    """fc1 and fc2 in one shard, fc3 in another, and an index saying so (or `index`)."""
    state = model.state_dict()
    shards = {
        "a.safetensors": [k for k in state if not k.startswith("fc3")],
        "b.safetensors": [k for k in state if k.startswith("fc3")],
    }
    os.makedirs(directory, exist_ok=True)
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, os.path.join(directory, shard))
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        json.dump(
            index
            if index is not None
            else {"metadata": {"total_size": 1}, "weight_map": weight_map},
            f,
        )
    return path


def test_a_hand_made_sharded_checkpoint_refits(mlp, tmp_path) -> None:
    b = MLP.build(1)
    index = _sharded(tmp_path / "ckpt", b)
    x = MLP.inputs()
    assert_matches(torchrefit.refit_module_weights(mlp, index)(*x), run_eager(b, *x))
    assert_matches(
        torchrefit.refit_module_weights(mlp, str(tmp_path / "ckpt"))(*x), run_eager(b, *x)
    )


def _weight_map(b: nn.Module, **changes: str | None) -> dict[str, object]:
    weight_map: dict[str, object] = {
        k: "b.safetensors" if k.startswith("fc3") else "a.safetensors" for k in b.state_dict()
    }
    weight_map.update(changes)
    return {"weight_map": {k: v for k, v in weight_map.items() if v is not None}}


BAD_INDEXES: dict[str, tuple[Callable[[nn.Module], dict | str], str]] = {
    "not_json": (lambda b: "{oops", "index"),
    "not_an_object": (lambda b: "[1, 2]", "weight_map"),
    "no_weight_map": (lambda b: '{"metadata": {}}', "weight_map"),
    "weight_map_not_an_object": (lambda b: '{"weight_map": ["a.safetensors"]}', "weight_map"),
    "shard_not_a_string": (lambda b: _weight_map(b, **{"fc1.bias": 3}), "fc1.bias"),  # type: ignore[arg-type]
    "duplicate_name": (
        lambda b: json.dumps(_weight_map(b))[:-2] + ', "fc1.bias": "b.safetensors"}}',
        "fc1.bias.*twice",
    ),
    "parent_directory": (lambda b: _weight_map(b, **{"fc3.bias": "../b.safetensors"}), r"\.\./b"),
    "absolute_path": (lambda b: _weight_map(b, **{"fc3.bias": "/etc/b.safetensors"}), "/etc/b"),
    "subdirectory": (lambda b: _weight_map(b, **{"fc3.bias": "sub/b.safetensors"}), "sub/b"),
    "dot_dot": (lambda b: _weight_map(b, **{"fc3.bias": ".."}), r"'\.\.'"),
    "missing_shard": (
        lambda b: _weight_map(b, **{"fc3.bias": "c.safetensors"}),
        "c.safetensors.*does not exist",
    ),
    "name_not_in_its_shard": (
        lambda b: _weight_map(b, **{"fc3.bias": "a.safetensors"}),
        "fc3.bias.*a.safetensors",
    ),
    "shard_holds_an_unlisted_name": (
        lambda b: _weight_map(b, **{"fc3.bias": None}),
        "b.safetensors.*fc3.bias",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INDEXES))
def test_a_bad_index_is_refused_naming_it(mlp, tmp_path, name: str) -> None:
    build, pattern = BAD_INDEXES[name]
    index = _sharded(tmp_path, MLP.build(1))
    content = build(MLP.build(1))
    with open(index, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(
        torchrefit.IncompatibleWeightsError, match="model.safetensors.index.json"
    ) as error:
        torchrefit.refit_module_weights(mlp, index)
    assert re.search(pattern, str(error.value)), str(error.value)


def test_a_name_in_two_shards_names_both(mlp, tmp_path) -> None:
    b = MLP.build(1)
    index = _sharded(tmp_path, b)
    state = b.state_dict()
    save_file(
        {
            "fc3.weight": state["fc3.weight"],
            "fc3.bias": state["fc3.bias"],
            "fc1.bias": state["fc1.bias"],
        },
        str(tmp_path / "b.safetensors"),
    )
    with pytest.raises(
        torchrefit.IncompatibleWeightsError,
        match=r"'b\.safetensors' holds 'fc1\.bias'.*'a\.safetensors'",
    ):
        torchrefit.refit_module_weights(mlp, index)


def test_a_malformed_shard_is_refused_naming_it(mlp, tmp_path) -> None:
    index = _sharded(tmp_path, MLP.build(1))
    (tmp_path / "b.safetensors").write_bytes(MALFORMED["gap_between_tensors"]())
    with pytest.raises(torchrefit.IncompatibleWeightsError, match=r"b\.safetensors"):
        torchrefit.refit_module_weights(mlp, index)


def test_a_shard_linking_out_of_the_directory_is_refused(mlp, tmp_path) -> None:
    index = _sharded(tmp_path / "ckpt", MLP.build(1))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(tmp_path / "ckpt" / "b.safetensors", outside / "b.safetensors")
    os.symlink(outside / "b.safetensors", tmp_path / "ckpt" / "b.safetensors")
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="link"):
        torchrefit.refit_module_weights(mlp, index)


def test_a_hugging_face_cache_snapshot_of_links_into_blobs_refits(mlp, tmp_path) -> None:
    """snapshots/<rev>/ holds links to blobs/<hash>: the index and its shards lie together."""
    b = MLP.build(1)
    _sharded(tmp_path / "blobs", b)
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for name in ("a.safetensors", "b.safetensors", "model.safetensors.index.json"):
        os.replace(tmp_path / "blobs" / name, tmp_path / "blobs" / f"hash-{name}")
        os.symlink(tmp_path / "blobs" / f"hash-{name}", snapshot / name)
    x = MLP.inputs()
    assert_matches(torchrefit.refit_module_weights(mlp, str(snapshot))(*x), run_eager(b, *x))


def test_a_directory_without_one_checkpoint_is_refused(mlp, tmp_path) -> None:
    with pytest.raises(torchrefit.IncompatibleWeightsError, match="no safetensors file"):
        torchrefit.refit_module_weights(mlp, str(tmp_path))
    b = MLP.build(1)
    save_file(b.state_dict(), str(tmp_path / "one.safetensors"))
    x = MLP.inputs()
    assert_matches(torchrefit.refit_module_weights(mlp, str(tmp_path))(*x), run_eager(b, *x))
    save_file(b.state_dict(), str(tmp_path / "two.safetensors"))
    with pytest.raises(
        torchrefit.IncompatibleWeightsError, match="one.safetensors.*two.safetensors"
    ):
        torchrefit.refit_module_weights(mlp, str(tmp_path))


# -- every missing and unexpected name on the error ----------------------------------------


def test_the_error_lists_every_missing_name_beyond_the_message(gpt2) -> None:
    _, b, compiled, _ = gpt2
    given = {k: v for k, v in b.state_dict().items() if not k.startswith("transformer.h.")}
    with pytest.raises(torchrefit.MissingWeightError) as error:
        torchrefit.refit_module_weights(compiled, given)
    expected = [k for k in b.state_dict() if k.startswith("transformer.h.")]
    assert len(expected) > 8 and sorted(error.value.missing) == sorted(expected)
    assert error.value.unexpected == []
    message = str(error.value)
    assert sum(name in message for name in expected) == 8 and f"{len(expected) - 8} more" in message


def test_the_error_lists_every_unexpected_and_missing_name(mlp) -> None:
    b = MLP.build(1)
    state = {f"model.{k}": v for k, v in b.state_dict().items()}
    state.update({f"optimizer.state.{i}": torch.zeros(1) for i in range(12)})
    with pytest.raises(torchrefit.UnexpectedWeightError) as error:
        torchrefit.refit_module_weights(mlp, state)
    assert error.value.unexpected == sorted(state)
    assert sorted(error.value.missing) == sorted(b.state_dict())
    assert "more: the error's .unexpected lists all" in str(error.value)
    assert isinstance(error.value, torchrefit.IncompatibleWeightsError)
