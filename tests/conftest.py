"""Shared fixtures: Inductor engines are compiled once per session (10 s or more each here)."""

from __future__ import annotations

import sys
from pathlib import Path

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
        compiled[name] = (model, torchrefit.compile(model, case.inputs(), backend="inductor", **case.settings))
    return compiled
