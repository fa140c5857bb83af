"""Comparison with eager PyTorch, with tolerances chosen by dtype."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from torchrefit.refit.verify import relative_error, tolerance


def run_eager(model: torch.nn.Module, *args: Any) -> Any:
    with torch.no_grad():
        return model(*args)


def assert_matches(actual: Any, expected: Any) -> None:
    """Every output tensor (all of a tuple, dict or ModelOutput) within its dtype's tolerance."""
    got, _ = pytree.tree_flatten_with_path(actual)
    want, _ = pytree.tree_flatten_with_path(expected)
    assert len(got) == len(want), f"{len(got)} outputs, eager gives {len(want)}"
    for (path, a), (_, e) in zip(got, want, strict=True):
        assert isinstance(a, torch.Tensor) and a.shape == e.shape, pytree.keystr(path)
        err, tol = relative_error(a, e), tolerance(a.dtype, e.dtype)
        assert err <= tol, f"output {pytree.keystr(path)}: relative error {err:.3g} > {tol}"


def assert_differs(actual: Any, expected: Any) -> None:
    """At least one output is far from `expected`: proves a test's weights really changed."""
    got = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    assert any(relative_error(a, e) > 1e-2 for a, e in zip(got, want, strict=True)), (
        "outputs did not change"
    )


def members_of(src: Path) -> dict[str, bytes]:
    """Every member of a zip file, by name."""
    with zipfile.ZipFile(src) as archive:
        return {info.filename: archive.read(info.filename) for info in archive.infolist()}


def write_members(dst: Path, members: dict[str, bytes], checksums: bool = True) -> None:
    """A zip of `members`. `checksums`: recompute checksums.json as a hostile author would,
    so the checks behind the checksums are what a test reaches."""
    members = dict(members)
    if checksums and "checksums.json" in members:
        sums = {
            n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "checksums.json"
        }
        members["checksums.json"] = json.dumps(sums).encode()
    with zipfile.ZipFile(dst, "w") as new:
        for name, data in members.items():
            new.writestr(name, data)


def rewrite_zip(
    src: Path, dst: Path, change: Callable[[str, bytes], bytes | None], checksums: bool = True
) -> None:
    """Copy the zip `src` to `dst`, passing every member's bytes through `change` (None drops
    it)."""
    changed = {name: change(name, data) for name, data in members_of(src).items()}
    write_members(dst, {n: d for n, d in changed.items() if d is not None}, checksums)


def run_interpreted(statement: str, timeout: float = 900) -> None:
    """Runs `statement` (Python, with tests/ on the path) in a fresh interpreter under
    Triton's interpreter (TRITON_INTERPRET=1: kernels run on CPU tensors) and fails with
    the end of its stderr unless it exits cleanly."""
    tests = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tests!r}); import torch; {statement}"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
