"""The torchrefit command, through subprocess as a user runs it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchrefit

from models import MLP, randomize

TESTS = Path(__file__).parent


# The torchrefit under test, not whichever one the venv's editable install points at (in a
# git worktree that is another checkout: its CLI then wrote files this checkout cannot read)
SOURCE = Path(torchrefit.__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": f"{SOURCE}{os.pathsep}{TESTS}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "torchrefit.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    a = randomize(MLP(), 0)
    compiled = torchrefit.compile(a, (torch.randn(4, 16),), backend="eager")
    path = root / "mlp.trf"
    torchrefit.save(compiled, str(path))
    return root, path


def test_help_is_complete() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("inspect", "refit", "compile"):
        assert command in result.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0 and "usage" in sub.stdout


def test_inspect(saved) -> None:
    _, path = saved
    text = run("inspect", str(path))
    assert text.returncode == 0, text.stderr
    assert (
        "fc1.weight" in text.stdout
        and "float32[32, 16]" in text.stdout
        and "fingerprint" in text.stdout
    )
    summary = json.loads(run("inspect", str(path), "--json").stdout)
    assert summary["weight_bytes"] == sum(c["bytes"] for c in summary["constants"]) > 0
    assert summary["settings"]["backend"] == "eager"


def test_refit_with_a_prefixed_checkpoint(saved, tmp_path) -> None:
    from safetensors.torch import save_file

    _, path = saved
    b = randomize(MLP(), 1)
    save_file({f"model.{k}": v for k, v in b.state_dict().items()}, str(tmp_path / "b.safetensors"))
    out = tmp_path / "b.trf"
    result = run(
        "refit",
        str(path),
        str(tmp_path / "b.safetensors"),
        "-o",
        str(out),
        "--strip-prefix",
        "model.",
        "--verify",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress when stderr is not a terminal
    assert "verified: all 6 engine constants equal" in result.stdout
    assert "x float32[4, 16]" in result.stdout and "Not checked" in result.stdout
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(torchrefit.load(str(out))(x), b(x), atol=1e-5)


def test_errors_exit_non_zero_with_the_message(saved, tmp_path) -> None:
    from safetensors.torch import save_file

    _, path = saved
    missing = run("inspect", str(tmp_path / "nothing.trf"))
    assert missing.returncode == 1 and "not a torchrefit file" in missing.stderr
    other = torch.nn.Linear(3, 3)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    wrong = run(
        "refit", str(path), str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "x.trf")
    )
    assert wrong.returncode == 1 and "fc1.weight" in wrong.stderr
    assert not (tmp_path / "x.trf").exists()
    usage = run("refit", str(path))
    assert usage.returncode == 2


def test_compile_from_a_factory(tmp_path) -> None:
    out = tmp_path / "c.trf"
    result = run(
        "compile", "models:MLP", "--input", "4,16", "--set", "backend=eager", "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(run("inspect", str(out), "--json").stdout)
    assert any(c["name"] == "fc3.bias" for c in summary["constants"])
    bad = run("compile", "models:NoSuchFactory", "--input", "4,16", "-o", str(out))
    assert bad.returncode == 1 and "NoSuchFactory" in bad.stderr


def test_compile_finds_factories_in_the_current_directory(tmp_path) -> None:
    """As the README writes it: `torchrefit compile mypkg.models:make_model` from the project."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        "import torch\n\ndef make_model():\n    return torch.nn.Linear(4, 4)\n"
    )
    out = tmp_path / "m.trf"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SOURCE)}  # not the current directory
    script = Path(sys.executable).parent / "torchrefit"  # the console script: no `-m` path magic
    if not script.exists():
        pytest.skip("the torchrefit console script is not installed beside this Python")
    result = subprocess.run(
        [
            str(script),
            "compile",
            "mypkg.models:make_model",
            "--input",
            "2,4",
            "--set",
            "backend=eager",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_shows_stages_and_engines(monkeypatch, tmp_path) -> None:
    from torchrefit import cli

    err, out = _Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    code = cli.main(
        [
            "compile",
            "models:MLP",
            "--input",
            "4,16",
            "--set",
            "backend=eager",
            "-o",
            str(tmp_path / "p.trf"),
        ]
    )
    assert code == 0, err.getvalue()
    shown = err.getvalue()
    for stage in ("importing models:MLP", "compiling models:MLP", "engines 1/1", "built _engine_0"):
        assert stage in shown, shown
    assert shown.endswith("\r\033[K")  # cleared: what follows starts on a clean line
    assert "compiled models:MLP into 1 engine(s)" in out.getvalue()
    assert "bytes" in out.getvalue() or "MB" in out.getvalue()


def test_verify_refuses_an_output_that_computes_otherwise(monkeypatch, saved, tmp_path) -> None:
    """The reloaded file is run against the refitted module: a file that loads wrong is
    never written."""
    from safetensors.torch import save_file

    from torchrefit import cli

    _, path = saved
    save_file(randomize(MLP(), 2).state_dict(), str(tmp_path / "c.safetensors"))

    def corrupted_load(p: str):
        module = torchrefit.load(p)
        module._torchrefit.store["fc3.bias"].add_(1.0)
        return module

    loads = iter([torchrefit.load, corrupted_load])  # the input file, then the scratch copy
    monkeypatch.setattr(cli, "load", lambda p: next(loads)(p))
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    out = tmp_path / "c.trf"
    code = cli.main(
        ["refit", str(path), str(tmp_path / "c.safetensors"), "-o", str(out), "--verify"]
    )
    assert code == 1 and "does not compute what the refitted module does" in err.getvalue()
    assert not out.exists() and not list(tmp_path.glob(".torchrefit-*"))
