"""The torchrefit command: inspect a file, refit it with new weights, compile a model or an LM.

Exit codes: 0 on success, 1 on an error (one line on stderr, nothing before it unless
--verbose), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from typing import TextIO

import torch

from ..errors import TorchRefitError
from .build import add_compile, add_compile_lm
from .files import add_inspect, add_refit
from .progress import quiet


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, bad usage: argparse has printed
        return exc.code if isinstance(exc.code, int) else 2
    with quiet(args.verbose) as err:
        try:
            args.run(args, err)
        except TorchRefitError as exc:
            _error(err, one_line(str(exc)))
            return 1
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback (TORCHREFIT_DEBUG=1 shows it)
            if os.environ.get("TORCHREFIT_DEBUG") == "1":
                raise
            _error(
                err,
                f"{type(exc).__name__}: {one_line(str(exc))} (--verbose shows torch's log, "
                "TORCHREFIT_DEBUG=1 the traceback)",
            )
            return 1
    return 0


def _error(err: TextIO, text: str) -> None:
    err.write(f"torchrefit: error: {text}\n")
    err.flush()


def one_line(text: str) -> str:
    """A message as one line, each sentence ending with one period (a message that quotes
    another ending in one would end in two)."""
    line = " ".join(text.split())
    return re.sub(r"(?<![./])\.\.(?=\s|$|\))", ".", line)


def _version() -> str:
    try:
        return importlib.metadata.version("torchrefit")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrefit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version",
        action="version",
        version=f"torchrefit {_version()} (torch {torch.__version__}, Python "
        f"{sys.version.split()[0]})",
    )
    verbose = "show torch's and torchrefit's log on stderr (by default only an error's one line)"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose
    )
    for add in (add_inspect, add_refit, add_compile, add_compile_lm):
        add(commands, common)
    return parser
