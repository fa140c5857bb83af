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

    loads = iter([torchrefit.load, corrupted_load])  # the input file, then the written copy
    monkeypatch.setattr(cli.files, "load", lambda p, **bound: next(loads)(p))
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    out = tmp_path / "c.trf"
    code = cli.main(
        ["refit", str(path), str(tmp_path / "c.safetensors"), "-o", str(out), "--verify"]
    )
    assert code == 1 and "does not compute what the refitted module does" in err.getvalue()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- what a newcomer meets: one line per error, --verbose, --version, compile-lm, py.typed -----


def test_an_error_is_one_line_with_nothing_before_it(tmp_path) -> None:
    """torch.export logs the graph of a model it cannot trace: none of it shows, only the
    error's one line, unless --verbose."""
    args = ["compile", "cli_factories:branchy", "--input", "2,4", "--set", "backend=eager"]
    quiet = run(*args, "-o", str(tmp_path / "b.trf"))
    assert quiet.returncode == 1
    assert quiet.stderr.count("\n") == 1 and quiet.stderr.startswith("torchrefit: error: ")
    assert "torch.cond" in quiet.stderr and quiet.stdout == ""
    verbose = run("--verbose", *args, "-o", str(tmp_path / "b.trf"))
    lines = verbose.stderr.splitlines()
    assert verbose.returncode == 1 and len(lines) > 1 and lines[-1] == quiet.stderr.strip()
    after = run(*args, "-v", "-o", str(tmp_path / "b.trf")).stderr.splitlines()  # either place
    assert len(after) == len(lines) and after[-1] == lines[-1]


def test_a_quoted_message_ending_in_a_period_ends_in_one(tmp_path) -> None:
    result = run("compile", "cli_factories:raising", "--input", "2,4", "-o", str(tmp_path / "r"))
    assert result.returncode == 1 and "always fails. Export it yourself" in result.stderr
    assert ".." not in result.stderr


def test_version(capsys) -> None:
    from torchrefit.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("torchrefit 0.")
    assert run("--version").stdout.startswith("torchrefit 0.")


def test_compile_lm_from_a_factory(tmp_path, capsys) -> None:
    """The file compile-lm writes generates what compile_lm gives in Python; without weights,
    it refits from the model's."""
    import cli_factories

    from torchrefit.cli import main

    out, bare = tmp_path / "lm.trf", tmp_path / "bare.trf"
    args = ["cli_factories:tiny_lm", "--max-batch-size", "2", "--max-seq-len", "16"]
    assert main(["compile-lm", *args, "--set", "backend=eager", "-o", str(out)]) == 0
    assert "max_seq_len 16" in capsys.readouterr().out
    assert (
        main(["compile-lm", *args, "--set", "backend=eager", "--no-weights", "-o", str(bare)]) == 0
    )
    model = cli_factories.tiny_lm().eval()
    expected = torchrefit.compile_lm(model, 2, 16, backend="eager")
    prompt = torch.tensor([[5, 9, 3], [7, 1, 4]])
    tokens = expected.generate(prompt, max_new_tokens=6)
    loaded = torchrefit.load(str(out))
    assert isinstance(loaded, torchrefit.CompiledLM) and loaded.max_seq_len == 16
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6), tokens)
    refitted = torchrefit.load(str(bare), weights=model)
    assert torch.equal(refitted.generate(prompt, max_new_tokens=6), tokens)
    assert bare.stat().st_size < out.stat().st_size / 2
    assert main(["compile-lm", *args, "--set", "backend=nope", "-o", str(out)]) == 1


def test_the_package_ships_py_typed(tmp_path) -> None:
    """A wheel built from this checkout holds py.typed (and the cli package)."""
    import shutil
    import zipfile

    root = SOURCE.parent
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(SOURCE, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    script = "from setuptools import build_meta as b; print(b.build_wheel('dist'))"
    build = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / "dist" / build.stdout.split()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "torchrefit/py.typed" in names and "torchrefit/cli/__main__.py" in names
