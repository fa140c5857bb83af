"""What the command shows while it runs: a status line on a terminal, nothing otherwise; and
unless --verbose, nothing of what torch, transformers or warnings would print."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from typing import TextIO


class Status(logging.Handler):
    """One status line on stderr: the command's stage, elapsed time, engines built of the
    total (from torchrefit's log records) and the latest record. Warnings are printed above
    it, on lines of their own."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream  # None: silent (stderr is not a terminal)
        self.started = time.perf_counter()
        self.current = ""
        self.detail = ""
        self.engines: list[int] = [0, 0]  # built, total

    def stage(self, text: str) -> None:
        self.current, self.detail, self.engines = text, "", [0, 0]
        self._draw()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.above(f"torchrefit: {record.levelname.lower()}: {message}")
            return
        counts = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("partitioned into") and counts:
            self.engines = [0, counts[0] if isinstance(counts[0], int) else 0]
        elif str(record.msg).startswith("built "):
            self.engines[0] += 1
        self.detail = message
        self._draw()

    def above(self, text: str) -> None:
        if self.stream is None:
            return
        self.stream.write(f"\r\033[K{text}\n")
        self._draw()

    def clear(self) -> None:
        if self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _draw(self) -> None:
        if self.stream is None:
            return
        built, total = self.engines
        engines = f", engines {built}/{total}" if total else ""
        line = f"[{time.perf_counter() - self.started:5.1f} s] {self.current}{engines}"
        if self.detail:
            line += f": {self.detail}"
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write(f"\r\033[K{line[:width]}")
        self.stream.flush()


@contextlib.contextmanager
def progress(stream: TextIO) -> Iterator[Status]:
    """Progress while a command runs, on `stream` when it is a terminal; the line is cleared
    when the command ends, so that results and errors print on a clean line."""
    status = Status(stream if _is_terminal(stream) else None)
    if status.stream is None:
        yield status
        return
    logger = logging.getLogger("torchrefit")
    level = logger.level
    logger.addHandler(status)
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, category, *_: status.above(
                f"{category.__name__}: {message}"
            )
            yield status
    finally:
        logger.removeHandler(status)
        logger.setLevel(level)
        status.clear()


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[TextIO]:
    """The stream for the command's own lines: stderr as it was when the command started.

    Unless `verbose`, everything else written to stderr while the command runs goes to
    /dev/null: torch's and transformers' log handlers (which write to the stream stderr was
    when they were made), Python warnings, and C++ prints to file descriptor 2. With
    `verbose`, they show, and torchrefit's own log records print as lines."""
    out = sys.stderr
    if verbose:
        with _logging_to(out):
            yield out
        return
    with _stderr_silenced(out) as stream, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield stream


@contextlib.contextmanager
def _logging_to(stream: TextIO) -> Iterator[None]:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("torchrefit: %(message)s"))
    logger = logging.getLogger("torchrefit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _stderr_silenced(out: TextIO) -> Iterator[TextIO]:
    """File descriptor 2 and sys.stderr point to /dev/null; the stream yielded writes where
    stderr wrote before (a copy of the descriptor, or `out` itself when it is no file)."""
    out.flush()
    real = _descriptor(out)
    saved = os.dup(2)
    stream: TextIO = out if real != 2 else os.fdopen(os.dup(2), "w", buffering=1)
    null = open(os.devnull, "w")  # noqa: SIM115 - closed below, after stderr is restored
    os.dup2(null.fileno(), 2)
    sys.stderr = null
    try:
        yield stream
    finally:
        sys.stderr = out
        os.dup2(saved, 2)
        os.close(saved)
        null.close()
        stream.flush()
        if stream is not out:
            stream.close()


def _descriptor(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
