"""A file's claims are checked before they cost anything: the devices it names exist here,
the memory it asks for beyond its bytes stays under a bound, loading reads each member once,
and every name its metadata uses refers to something, so a broken file fails at load with a
SerializationError, never at the first call or refit with a KeyError or AssertionError."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchrefit
from torchrefit.cli import main

from cases import CASES
from helpers import members_of, write_members

Edit = Callable[[dict[str, Any], dict[str, bytes]], None]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bounds")
    case = CASES["mlp"]
    compiled = torchrefit.compile(case.build(0), case.inputs(), backend="eager")
    paths = {"full": root / "full.trf", "stripped": root / "stripped.trf"}
    torchrefit.save(compiled, str(paths["full"]))
    torchrefit.save(compiled, str(paths["stripped"]), include_weights=False)
    folded = CASES["conv_bn_folded"]
    program = torchrefit.compile(
        folded.build(0), folded.inputs(), backend="eager", **folded.settings
    )
    paths["program"] = root / "program.trf"
    torchrefit.save(program, str(paths["program"]))
    return paths


def _edited(src: Path, dst: Path, edit: Edit) -> Path:
    """`src` with its metadata (and members) edited, every checksum recomputed."""
    members = members_of(src)
    metadata = json.loads(members["metadata.json"])
    edit(metadata, members)
    members["metadata.json"] = json.dumps(metadata).encode()
    write_members(dst, members)
    return dst


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# -- devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda:99", "cuda:999", "xpu", "hpu", "meta", "mps"])
def test_a_device_this_machine_lacks_is_refused_naming_it(files, tmp_path, device: str) -> None:
    def move(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        for spec in metadata["state"]["store"].values():
            spec["device"] = device
        for guard in metadata["state"]["guards"]:
            guard[1] = device

    path = _edited(files["full"], tmp_path / "gpu.trf", move)
    with pytest.raises(torchrefit.SerializationError, match=device) as error:
        torchrefit.load(str(path))
    if device == "cuda:99":  # which device the engines need, and how to get the weights
        assert "weights.safetensors" in str(error.value)
    assert main(["inspect", str(path)]) == 0  # metadata only: no device needed


# -- memory a file claims ---------------------------------------------------------------------


def _grow(rows: int) -> Edit:
    """fc1.weight recorded with `rows` rows, in its weight spec and its store entry alike."""

    def edit(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        state = metadata["state"]
        state["store"]["fc1.weight"]["shape"][0] = rows
        next(s for s in state["specs"] if s["fqn"] == "fc1.weight")["shape"][0] = rows

    return edit


def test_a_stripped_file_claiming_more_than_its_bound_is_refused_before_allocating(
    files, tmp_path
) -> None:
    path = _edited(files["stripped"], tmp_path / "big.trf", _grow(1 << 25))  # 2 GiB of float32
    before = _rss()
    with pytest.raises(torchrefit.SerializationError, match="max_bytes="):
        torchrefit.load(str(path))
    assert _rss() - before < 64 << 20


def test_stripped_placeholders_within_the_bound_cost_no_memory_until_refitted(
    files, tmp_path
) -> None:
    """Allowed explicitly, a 512 MB claim allocates room that nothing writes."""
    path = _edited(files["stripped"], tmp_path / "half.trf", _grow(1 << 23))
    before = _rss()
    module = torchrefit.load(str(path), max_bytes=1 << 30)
    assert _rss() - before < 64 << 20
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        module(*CASES["mlp"].inputs())


def test_a_stripped_file_loaded_with_its_weights_may_claim_their_size(files, monkeypatch) -> None:
    """With no allowance of its own beyond its size, the file may claim what its weights
    supply."""
    from torchrefit import serialize

    path = str(files["stripped"])
    monkeypatch.setattr(serialize, "DEFAULT_CLAIM_BYTES", -Path(path).stat().st_size)
    with pytest.raises(torchrefit.SerializationError, match="max_bytes="):
        torchrefit.load(path)
    case = CASES["mlp"]
    b = case.build(1)
    module = torchrefit.load(path, weights=b.state_dict())
    x = case.inputs()
    assert torch.equal(module(*x), torchrefit.compile(b, x, backend="eager")(*x))


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64, eos_token_id=2
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=16, backend="eager")
    path = tmp_path_factory.mktemp("lm") / "lm.trf"
    torchrefit.save(lm, str(path))
    return path


def test_a_decoders_limits_must_agree_with_its_kv_cache(lm_file, tmp_path) -> None:
    """generate allocates by max_seq_len: a value the cache does not have is refused at load."""

    def longer(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        metadata["state"]["lm"]["max_seq_len"] = 1 << 27

    path = _edited(lm_file, tmp_path / "long.trf", longer)
    with pytest.raises(torchrefit.SerializationError, match="max_seq_len"):
        torchrefit.load(str(path))
    loaded = torchrefit.load(str(lm_file))
    assert loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)


def test_a_kv_cache_larger_than_the_bound_is_refused_before_allocating(lm_file, tmp_path) -> None:
    def longer(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        state = metadata["state"]
        state["lm"]["max_seq_len"] = 1 << 22
        for key in state["lm"]["cache_keys"]:
            state["store"][key]["shape"][2] = 1 << 22
            next(s for s in state["specs"] if s["fqn"] == key)["shape"][2] = 1 << 22

    path = _edited(lm_file, tmp_path / "cache.trf", longer)  # 4 x 1 GiB of float32 caches
    before = _rss()
    with pytest.raises(torchrefit.SerializationError, match="max_bytes="):
        torchrefit.load(str(path))
    assert _rss() - before < 64 << 20


INSPECT = (
    "import sys\n"
    "from torchrefit.cli import main\n"
    "code = main(['inspect', '--json', sys.argv[1]])\n"
    "print('IMPORTED', sorted(m for m in ('torch.onnx', 'torch._inductor') if m in sys.modules),"
    " file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def test_inspect_imports_nothing_a_dtype_names(files, tmp_path) -> None:
    def name_modules(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        metadata["state"]["store"]["fc1.weight"]["dtype"] = "onnx"
        metadata["state"]["engine_dtypes"]["fc1.bias"] = "_inductor"

    path = _edited(files["full"], tmp_path / "modules.trf", name_modules)
    done = subprocess.run(
        [sys.executable, "-c", INSPECT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1 and "names no torch dtype" in done.stderr, done.stderr
    assert "IMPORTED []" in done.stderr, done.stderr
    with pytest.raises(torchrefit.SerializationError, match="names no torch dtype"):
        torchrefit.load(str(path))


LOAD = (
    "import sys, torchrefit\n"
    "try:\n    torchrefit.load(sys.argv[1])\n"
    "except torchrefit.TorchRefitError as exc:\n    print('REFUSED', exc, file=sys.stderr)\n"
    "print('IMPORTED', 'torch.onnx' in sys.modules, file=sys.stderr)\n"
)


@pytest.mark.parametrize("kind, name", [("dtype", "onnx"), ("layout", "onnx"), ("device", "meta")])
def test_a_stored_graph_names_dtypes_and_devices_from_the_table(
    files, tmp_path, kind: str, name: str
) -> None:
    """A dtype, layout or device argument of a stored graph is looked up in the table: a
    name that is a torch submodule imports nothing; a device engines do not run on is
    refused."""

    def argue(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        nodes = json.loads(members["engines/_engine_0.bin"])
        call = next(n for n in nodes if n["op"] == "call_function")
        call["kwargs"] = {kind: {kind: name}}
        members["engines/_engine_0.bin"] = json.dumps(nodes).encode()
        engine = next(c for c in metadata["children"] if c["kind"] == "engine")
        engine["sha256"] = hashlib.sha256(members["engines/_engine_0.bin"]).hexdigest()

    path = _edited(files["full"], tmp_path / "argued.trf", argue)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=300
    )
    assert "REFUSED" in done.stderr and name in done.stderr, done.stderr
    assert "IMPORTED False" in done.stderr, done.stderr


def test_inspect_output_stays_proportional_to_the_file(files, tmp_path, capsys) -> None:
    """A settings value nested deep (which JSON indents once per level, per line) is shown
    shortened."""

    def nest(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        value: Any = [0] * 100_000
        for _ in range(200):
            value = [value]
        metadata["state"]["settings"]["torch_executed_ops"] = value

    path = _edited(files["full"], tmp_path / "nested.trf", nest)
    assert main(["inspect", "--json", str(path)]) == 0
    shown = capsys.readouterr().out
    assert len(shown) < 2 * path.stat().st_size


# -- reading each member once -------------------------------------------------------------------


def test_children_repeated_are_refused_and_loading_stays_linear(files, tmp_path) -> None:
    def repeat(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
        metadata["children"] = metadata["children"] * 2000

    path = _edited(files["full"], tmp_path / "repeated.trf", repeat)
    started = time.perf_counter()
    with pytest.raises(torchrefit.SerializationError, match="repeat"):
        torchrefit.load(str(path))
    assert time.perf_counter() - started < 5


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_member_twice_in_the_zip_is_refused(files, tmp_path) -> None:
    path = tmp_path / "twice.trf"
    with zipfile.ZipFile(files["full"]) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info.filename))
        new.writestr("engines/_engine_0.bin", old.read("engines/_engine_0.bin"))
    with pytest.raises(torchrefit.SerializationError, match="twice"):
        torchrefit.load(str(path))


def test_each_member_is_hashed_once(files, monkeypatch) -> None:
    hashed: list[int] = []
    real = hashlib.sha256

    def counted(data: bytes = b"", **kwargs: Any) -> Any:
        hashed.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counted)
    torchrefit.load(str(files["full"]))
    with zipfile.ZipFile(files["full"]) as archive:
        members = [i.file_size for i in archive.infolist() if i.filename != "checksums.json"]
    assert sorted(hashed) == sorted(members)


@pytest.mark.parametrize("how", ["no checksums", "unlisted member", "unused member"])
def test_every_member_is_checked(files, tmp_path, how: str) -> None:
    members = members_of(files["full"])
    if how == "no checksums":
        del members["checksums.json"]
    elif how == "unlisted member":
        sums = json.loads(members["checksums.json"])
        del sums["weights.safetensors"]
        members["checksums.json"] = json.dumps(sums).encode()
    else:
        members["engines/extra.bin"] = b"code nobody checks"
    path = tmp_path / "unchecked.trf"
    write_members(path, members, checksums=how == "unused member")
    with pytest.raises(torchrefit.SerializationError, match="checksums.json|does not use"):
        torchrefit.load(str(path))


# -- names the metadata uses ------------------------------------------------------------------


def _mutation(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
    metadata["state"]["mutations"] = [["buffer", "no.such.buffer"]]


def _program_output(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
    program = metadata["state"]["weight_program"]
    program["outputs"] = [f"{k}_renamed" for k in program["outputs"]]


def _variant(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
    engine = next(c for c in metadata["children"] if c["kind"] == "engine")
    code = members[f"engines/{engine['name']}.bin"]
    members[f"engines/{engine['name']}.variant0.bin"] = code
    signature = [["float32", [4, 16], [16, 1]], ["float32", [4, 16], [16, 1]]]  # two, not one
    engine["variants"] = [{"signature": signature, "sha256": hashlib.sha256(code).hexdigest()}]


def _outputs(metadata: dict[str, Any], members: dict[str, bytes]) -> None:
    metadata["state"]["mutations"] = [["input", "0"]]  # one more value than the graph returns


BROKEN = {
    "a state write to no buffer": ("full", _mutation),
    "a weight program missing a derived constant": ("program", _program_output),
    "a variant signature of other arity": ("full", _variant),
    "more outputs than the graph returns": ("full", _outputs),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_reference_is_refused_at_load(files, tmp_path, case: str) -> None:
    source, edit = BROKEN[case]
    path = _edited(files[source], tmp_path / "broken.trf", edit)
    with pytest.raises(torchrefit.SerializationError, match="malformed"):
        torchrefit.load(str(path))
