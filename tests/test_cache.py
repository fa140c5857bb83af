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
    torchrefit.compile(
        case.build(0), case.inputs(), backend="eager", min_block_size=2, cache_dir=str(tmp_path)
    )
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
        case.build(0),
        case.inputs(),
        backend="eager",
        cache_dir=str(tmp_path),
        cache_max_bytes=bound,
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


# -- the cache is an optimization: its failures are warnings ------------------------------


def _compile_mlp(cache_dir: str, seed: int = 0):
    case = CASES["mlp"]
    model = case.build(seed)
    compiled = torchrefit.compile(model, case.inputs(), backend="eager", cache_dir=cache_dir)
    x = case.inputs()
    assert_matches(compiled(*x), run_eager(model, *x))
    return compiled


def test_an_unwritable_cache_dir_warns_and_compiles(tmp_path, monkeypatch, caplog) -> None:
    import torchrefit.fileio as fileio

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refused)
    with caplog.at_level("WARNING", logger="torchrefit"):
        _compile_mlp(str(tmp_path))
    assert "could not store" in caplog.text
    assert not _entries(tmp_path)


def test_a_read_only_cache_still_serves_hits(tmp_path, monkeypatch) -> None:
    _compile_mlp(str(tmp_path))
    import torchrefit.cache as cache

    def refused(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(cache.os, "utime", refused)
    monkeypatch.setattr(cache.os, "remove", refused)
    monkeypatch.setattr(
        compile_module, "lower", lambda *a, **k: (_ for _ in ()).throw(AssertionError("miss"))
    )
    _compile_mlp(str(tmp_path), seed=1)


def test_a_cache_dir_that_cannot_be_made_warns_and_compiles(tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING", logger="torchrefit"):
        _compile_mlp(str(blocker / "cache"))
    assert "unusable" in caplog.text


@pytest.mark.parametrize("kind", ["directory", "fifo", "garbage"])
def test_a_bad_entry_warns_and_compiles(tmp_path, caplog, kind: str) -> None:
    import threading

    _compile_mlp(str(tmp_path))
    (entry,) = _entries(tmp_path)
    entry.unlink()
    if kind == "directory":
        entry.mkdir()
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.write_bytes(b"PK\x03\x04 not a zip at all")
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _compile_mlp(str(tmp_path), seed=1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        done.set()

    with caplog.at_level("WARNING", logger="torchrefit"):
        threading.Thread(target=run, daemon=True).start()
        assert done.wait(60), "compile hung on the cache entry"
    assert not errors, errors
    assert "engine cache" in caplog.text


def test_orphaned_temporaries_are_removed_and_home_is_expanded(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cache_dir = tmp_path / ".cache" / "torchrefit"
    cache_dir.mkdir(parents=True)
    orphan = cache_dir / f".{'a' * 64}.trf.x1y2.tmp"
    orphan.write_bytes(b"half a file")
    old = os.path.getmtime(orphan) - 2 * 3600
    os.utime(orphan, (old, old))
    fresh = cache_dir / f".{'d' * 64}.trf.z3.tmp"  # just made by a writer: kept
    fresh.write_bytes(b"being written")
    _compile_mlp("~/.cache/torchrefit")
    assert len(_entries(cache_dir)) == 1
    assert not orphan.exists() and fresh.exists()
    assert not (Path.cwd() / "~").exists()


def test_eviction_deletes_only_what_the_cache_wrote(tmp_path) -> None:
    """A cache directory shared with other files (or named by mistake): the cache removes
    its own entries (named by their key, marked by the cache) and its own orphans only."""
    import fcntl

    foreign = {
        "precious.trf": b"a user's module",
        f"{'b' * 64}.trf": b"named like an entry, not written by the cache",
        ".precious.trf.abc123.tmp": b"another program's temporary",
        "notes.tmp": b"notes",
    }
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    orphan = tmp_path / f".{'c' * 64}.trf.dead1.tmp"  # a killed cache writer's
    live = tmp_path / f".{'e' * 64}.trf.live1.tmp"  # a live writer's: it holds its lock
    for path in (orphan, live, *(tmp_path / n for n in foreign)):
        path.touch() if path.exists() else path.write_bytes(b"half")
        os.utime(path, (1, 1))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _compile_mlp(str(tmp_path))
        case = CASES["conv_bn"]  # a second structure, over the bound of 1 byte: evictions
        torchrefit.compile(
            case.build(0), case.inputs(), backend="eager", cache_dir=str(tmp_path),
            cache_max_bytes=1,
        )  # fmt: skip
    assert not [p for p in tmp_path.glob("*.trf") if p.name not in foreign]  # evicted
    assert {n: (tmp_path / n).read_bytes() for n in foreign} == foreign
    assert not orphan.exists() and live.exists()


def test_a_hit_takes_the_compiling_calls_settings(tmp_path) -> None:
    """The entry's own runtime settings describe how its writer ran it; the module a hit
    returns runs as this call asks."""
    case = CASES["mlp"]
    torchrefit.compile(case.build(0), case.inputs(), backend="eager", cache_dir=str(tmp_path))
    hit = torchrefit.compile(
        case.build(1), case.inputs(), backend="eager", cache_dir=str(tmp_path),
        double_buffer=True, check_finite=False,
    )  # fmt: skip
    assert len(_entries(tmp_path)) == 1
    assert hit.settings.double_buffer and not hit.settings.check_finite
    assert hit.settings.cache_dir == str(tmp_path)
