"""Every file write is atomic: after a kill -9 or a full disk during a save, the old file is
whole and loads to the outputs it gave."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import torchrefit
import torchrefit.fileio as fileio

from cases import CASES

WRITER = textwrap.dedent(
    """
    import sys, torch, torchrefit
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)]).eval()  # 67 MB
    compiled = torchrefit.compile(model, (torch.randn(2, 1024),), backend="eager")
    print("ready", flush=True)
    while True:
        torchrefit.save(compiled, sys.argv[1])
    """
)


def _saved(tmp_path):
    case = CASES["mlp"]
    compiled = torchrefit.compile(case.build(0), case.inputs(), backend="eager")
    path = str(tmp_path / "m.trf")
    torchrefit.save(compiled, path)
    x = case.inputs()
    return compiled, path, x, compiled(*x)


def test_kill_during_save_never_loses_the_old_file(tmp_path) -> None:
    compiled, path, x, expected = _saved(tmp_path)
    trials, lost = 8, 0
    rng = random.Random(0)
    for _ in range(trials):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, path],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside a save of 67 MB
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        try:
            loaded = torchrefit.load(path)
        except torchrefit.TorchRefitError:
            lost += 1
            continue
        # the old file, or one the writer completed before the kill: either loads and runs
        y = torch.randn(2, 1024) if loaded._torchrefit.guards[0].shape == (2, 1024) else x[0]
        assert loaded(y).shape[0] == y.shape[0]
    assert lost == 0, f"{lost} of {trials} kills left an unreadable file"
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(leftovers) <= trials  # orphans only, beside an intact file


def test_a_full_disk_midway_leaves_the_old_file_and_says_so(tmp_path, monkeypatch) -> None:
    compiled, path, x, expected = _saved(tmp_path)
    real_write = fileio.os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FullDisk(real_write(fd, mode)))
    with pytest.raises(torchrefit.SerializationError, match="No space left"):
        torchrefit.save(compiled, path)
    monkeypatch.undo()
    assert torch.equal(torchrefit.load(path)(*x), expected)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_mutable_save_and_the_cli_write_atomically(tmp_path, monkeypatch) -> None:
    compiled, path, x, expected = _saved(tmp_path)
    case = CASES["mlp"]
    mutable = torchrefit.MutableModule(case.build(1), backend="eager")
    mutable(*x)

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(torchrefit.SerializationError):
        mutable.save(path)
    from torchrefit.cli import main

    weights = str(tmp_path / "w.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in case.build(1).state_dict().items()}, weights)
    assert main(["refit", path, weights, "-o", path]) == 1
    monkeypatch.undo()
    assert torch.equal(torchrefit.load(path)(*x), expected)


def test_saving_onto_a_directory_is_refused(tmp_path) -> None:
    compiled, _, _, _ = _saved(tmp_path)
    with pytest.raises(torchrefit.SerializationError, match="directory"):
        torchrefit.save(compiled, str(tmp_path))


def test_the_next_write_sweeps_orphans_but_never_a_live_writers_temporary(tmp_path) -> None:
    """An orphan is a temporary of this target that no writer holds a lock on, last written
    over a minute ago; a temporary just made, or one a live writer holds, is left alone."""
    import fcntl

    compiled, path, x, expected = _saved(tmp_path)
    orphan, held, fresh = (tmp_path / f".m.trf.{tag}.tmp" for tag in ("dead", "held", "fresh"))
    other = tmp_path / ".other.trf.dead.tmp"  # another target's: not this write's to judge
    for temporary in (orphan, held, fresh, other):
        temporary.write_bytes(b"half a file")
    for temporary in (orphan, held, other):
        os.utime(temporary, (1, 1))
    with open(held, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        torchrefit.save(compiled, path)
        assert not orphan.exists() and held.exists() and fresh.exists() and other.exists()
    torchrefit.save(compiled, path)
    assert not held.exists() and fresh.exists()
    assert torch.equal(torchrefit.load(path)(*x), expected)


def test_refit_verify_killed_leaves_an_orphan_the_next_run_sweeps(tmp_path) -> None:
    """kill -9 while `refit --verify` writes or checks its output: the old output is whole,
    and the temporary left behind goes with the next write of that output."""
    from safetensors.torch import save_file

    from torchrefit.cli import main

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)]).eval()
    x = (torch.randn(2, 1024),)
    big = str(tmp_path / "big.trf")
    torchrefit.save(torchrefit.compile(model, x, backend="eager"), big)  # 67 MB
    weights = str(tmp_path / "w.safetensors")
    save_file({k: torch.randn_like(v) for k, v in model.state_dict().items()}, weights)
    out = tmp_path / "out.trf"
    source = os.path.dirname(os.path.dirname(torchrefit.__file__))
    refit = subprocess.Popen(
        [sys.executable, "-m", "torchrefit.cli", "refit", big, weights, "-o", str(out), "--verify"],
        env={**os.environ, "PYTHONPATH": source},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not _hidden(tmp_path) and refit.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        refit.send_signal(signal.SIGKILL)
        refit.wait()
    orphans = _hidden(tmp_path)
    assert orphans and not out.exists(), "the kill came after the refit ended"
    for orphan in orphans:
        os.utime(orphan, (1, 1))  # as if the kill was long ago
    assert main(["refit", big, weights, "-o", str(out)]) == 0
    assert not _hidden(tmp_path), "the orphan of the killed refit stayed"
    assert torchrefit.load(str(out))(*x).shape == (2, 1024)


def _hidden(directory) -> list:
    return [p for p in directory.iterdir() if p.name.startswith(".")]
