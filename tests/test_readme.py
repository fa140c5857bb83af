"""The README says what the code does."""

from __future__ import annotations

from pathlib import Path

import torchrefit
from torchrefit.settings import settings_table

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_settings_table_matches_the_dataclass() -> None:
    assert settings_table() in README


def test_every_error_is_named() -> None:
    for name in torchrefit.__all__:
        obj = getattr(torchrefit, name)
        if isinstance(obj, type) and issubclass(obj, torchrefit.TorchRefitError):
            assert name in README, name


def test_commands_match_the_makefile() -> None:
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "make demo" in README and "make test" in README
    assert "demo:" in makefile and "test:" in makefile and "make test" in ci
