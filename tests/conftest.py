"""Shared fixtures: Inductor engines are compiled once per session (10 s or more each here)."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import torchrefit  # noqa: E402

from cases import CASES  # noqa: E402

INDUCTOR_CASES = ("conv_bn_folded", "bert", "gpt2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def inductor_modules() -> dict[str, tuple[torch.nn.Module, torchrefit.CompiledModule]]:
    """name -> (eager model A, module compiled from A by Inductor). Refit with in_place=False."""
    compiled = {}
    for name in INDUCTOR_CASES:
        case = CASES[name]
        model = case.build(0)
        compiled[name] = (
            model,
            torchrefit.compile(model, case.inputs(), backend="inductor", **case.settings),
        )
    return compiled


@pytest.fixture
def unpickling_calls(monkeypatch) -> list[str]:
    """pickle.loads, pickle.load and torch.load raise, and record that they were called."""
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called: weights and metadata must never be unpickled")

        return refused

    for owner, attr in ((pickle, "loads"), (pickle, "load"), (torch, "load")):
        monkeypatch.setattr(owner, attr, refuse(f"{owner.__name__}.{attr}"))
    return calls
