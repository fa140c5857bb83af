"""Fuzzed files: a typed error, or a module that computes exactly what the original did;
never another exception, never a hang, never an allocation far beyond the file's size."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchrefit
from torchrefit.cli import main

from cases import CASES
from helpers import write_members

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
COUNT: dict[str, int] = {"cases": 0, "untyped": 0}


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[bytes, tuple[torch.Tensor, ...], torch.Tensor]:
    case = CASES["mlp"]
    compiled = torchrefit.compile(case.build(0), case.inputs(), backend="eager")
    path = tmp_path_factory.mktemp("fuzz") / "m.trf"
    torchrefit.save(compiled, str(path))
    x = case.inputs()
    return path.read_bytes(), x, compiled(*x)


class Allocations:
    """The largest tensor allocated while loading (patches torch.empty and friends)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.largest = 0
        for name in ("empty", "zeros"):
            real = getattr(torch, name)

            def counted(*args: Any, _real: Any = real, **kwargs: Any) -> torch.Tensor:
                tensor = _real(*args, **kwargs)
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
                return tensor

            monkeypatch.setattr(torch, name, counted)


def _outcome(path: Path, x: tuple[torch.Tensor, ...], expected: torch.Tensor) -> str:
    COUNT["cases"] += 1
    try:
        module = torchrefit.load(str(path))
    except torchrefit.TorchRefitError:
        return "refused"
    except Exception:
        COUNT["untyped"] += 1
        raise
    assert torch.equal(module(*x), expected), "a corrupted file loaded with other outputs"
    return "identical"


@FUZZ
@given(data=st.data())
def test_corrupted_bytes_are_refused_or_harmless(original, tmp_path_factory, data) -> None:
    raw, x, expected = original
    blob = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(blob) - 1))
        blob[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path_factory.mktemp("c") / "f.trf"
    path.write_bytes(bytes(blob))
    _outcome(path, x, expected)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 62), 1 << 62)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _rewritten(raw: bytes, metadata: dict[str, Any], dst: Path) -> None:
    """A hostile author's edit: metadata replaced, every checksum recomputed."""
    with zipfile.ZipFile(io.BytesIO(raw)) as old:
        members = {i.filename: old.read(i.filename) for i in old.infolist()}
    members["metadata.json"] = json.dumps(metadata).encode()
    write_members(dst, members)


@FUZZ
@given(data=st.data())
def test_hostile_metadata_edits_give_typed_errors_and_bounded_allocations(
    original, tmp_path_factory, monkeypatch_module, data
) -> None:
    raw, x, _ = original
    metadata = json.loads(zipfile.ZipFile(io.BytesIO(raw)).read("metadata.json"))
    paths = _paths(metadata)[1:]
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths))
        parent = metadata
        try:
            for key in where[:-1]:
                parent = parent[key]
            parent[where[-1]] = data.draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):
            continue
    path = tmp_path_factory.mktemp("j") / "f.trf"
    _rewritten(raw, metadata, path)
    allocations = Allocations(monkeypatch_module)
    COUNT["cases"] += 1
    try:
        module = torchrefit.load(str(path))
    except torchrefit.TorchRefitError:
        return
    except Exception:
        COUNT["untyped"] += 1
        raise
    finally:
        monkeypatch_module.undo()
    assert allocations.largest <= 16 * len(raw) + (1 << 20)
    # a hostile file that passes validation may compute garbage when called (as a hostile
    # model would): what it cannot do is run code or allocate without bound, checked above
    assert isinstance(module, torchrefit.CompiledModule)


@pytest.fixture
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_cli_prints_one_line_for_corrupted_files(original, tmp_path, capsys) -> None:
    raw, _, _ = original
    for i, cut in enumerate((0, 10, len(raw) // 3, len(raw) - 5)):
        path = tmp_path / f"cut{i}.trf"
        path.write_bytes(raw[:cut])
        assert main(["inspect", str(path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("torchrefit: error:"), err


def test_a_crash_cannot_hide_in_process(original, tmp_path) -> None:
    """A few corrupted files loaded in fresh processes: each exits cleanly (0 or typed 1)."""
    raw, _, _ = original
    script = (
        "import sys, torchrefit\n"
        "try:\n    torchrefit.load(sys.argv[1])\n"
        "except torchrefit.TorchRefitError:\n    sys.exit(1)\n"
    )
    for i, offset in enumerate((30, len(raw) // 2, len(raw) - 30)):
        blob = bytearray(raw)
        blob[offset] ^= 0xFF
        path = tmp_path / f"p{i}.trf"
        path.write_bytes(bytes(blob))
        done = subprocess.run(
            [sys.executable, "-c", script, str(path)], capture_output=True, timeout=120
        )
        assert done.returncode in (0, 1), done.stderr.decode()[-2000:]


def test_report_fuzz_counts() -> None:
    print(f"fuzz cases: {COUNT['cases']}, untyped errors: {COUNT['untyped']}")
    assert COUNT["untyped"] == 0
