"""The engine cache: a structure compiled before is loaded and refitted, never recompiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchrefit

from cases import CASES
from helpers import assert_matches, run_eager

compile_module = sys.modules["torchrefit.compile"]


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.trf"))


def test_hit_loads_and_refits_without_compiling(tmp_path, monkeypatch) -> None:
    case = CASES["bert"]
    a, b = case.build(0), case.build(1)
    torchrefit.compile(a, case.inputs(), backend="eager", cache_dir=str(tmp_path))
    assert len(_entries(tmp_path)) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit lowered the program again")

    monkeypatch.setattr(compile_module, "lower", forbidden)
    hit = torchrefit.compile(b, case.inputs(), backend="eager", cache_dir=str(tmp_path))
    x = case.inputs()
    assert_matches(hit(*x), run_eager(b, *x))


def test_other_settings_or_structure_miss(tmp_path) -> None:
    case = CASES["mlp"]
    torchrefit.compile(case.build(0), case.inputs(), backend="eager", cache_dir=str(tmp_path))
    torchrefit.compile(case.build(0), case.inputs(), backend="eager", min_block_size=2, cache_dir=str(tmp_path))
    other = CASES["conv_bn"]
    torchrefit.compile(other.build(0), other.inputs(), backend="eager", cache_dir=str(tmp_path))
    assert len(_entries(tmp_path)) == 3


def test_corrupted_entry_is_rebuilt(tmp_path) -> None:
    case = CASES["mlp"]
    torchrefit.compile(case.build(0), case.inputs(), backend="eager", cache_dir=str(tmp_path))
    (entry,) = _entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[:100])
    b = case.build(1)
    module = torchrefit.compile(b, case.inputs(), backend="eager", cache_dir=str(tmp_path))
    x = case.inputs()
    assert_matches(module(*x), run_eager(b, *x))
    assert torchrefit.load(str(entry), weights=b)  # rebuilt and readable again


def test_size_bound_evicts_least_recently_used(tmp_path) -> None:
    names = ["mlp", "conv_bn", "tied_embeddings"]
    for name in names:
        case = CASES[name]
        torchrefit.compile(case.build(0), case.inputs(), backend="eager", cache_dir=str(tmp_path))
    sizes = [p.stat().st_size for p in _entries(tmp_path)]
    bound = max(sizes) + 1
    case = CASES["mlp"]
    torchrefit.compile(
        case.build(0), case.inputs(), backend="eager", cache_dir=str(tmp_path), cache_max_bytes=bound
    )
    entries = _entries(tmp_path)
    assert sum(p.stat().st_size for p in entries) <= bound and len(entries) < 3
    newest = max(entries, key=lambda p: p.stat().st_mtime)
    assert torchrefit.load(str(newest), weights=case.build(2))  # the entry just used stays


WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
import torchrefit
from cases import CASES
case = CASES["gpt2"]
torchrefit.compile(case.build(0), case.inputs(), backend="eager", cache_dir={cache!r})
"""


def test_concurrent_writers_leave_one_valid_entry(tmp_path) -> None:
    code = WRITER.format(tests=str(Path(__file__).parent), cache=str(tmp_path))
    writers = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert all(w.wait(timeout=300) == 0 for w in writers)
    (entry,) = _entries(tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    case = CASES["gpt2"]
    b = case.build(1)
    module = torchrefit.load(str(entry), weights=b)
    x = case.inputs()
    assert_matches(module(*x), run_eager(b, *x))


@pytest.mark.inductor
def test_inductor_cache_hit(tmp_path) -> None:
    case = CASES["mlp"]
    a, b = case.build(0), case.build(1)
    torchrefit.compile(a, case.inputs(), cache_dir=str(tmp_path))
    module = torchrefit.compile(b, case.inputs(), cache_dir=str(tmp_path))
    assert all(e.backend == "inductor" for e in module.engines().values())
    x = case.inputs()
    assert_matches(module(*x), run_eager(b, *x))
