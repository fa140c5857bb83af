"""What keeps calls and refits of one module apart: every call computes with one complete
weight set, and refits of one module run one at a time.

`Guard` is a readers-writer lock (calls read, the commit writes; a waiting writer goes
first, so refits are not starved by a stream of calls) and a mutex that serializes whole
refits. On CUDA it also orders the GPU work without a device-wide sync: a commit's stream
waits for the calls already launched, and a call's stream waits for the last commit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Guard:
    def __init__(self) -> None:
        self.refit = threading.RLock()  # held for a whole refit: read .. commit
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._calls: dict[Any, Any] = {}  # CUDA stream -> event after its last call's launch
        self._committed: Any = None  # CUDA event after the last commit's writes
        self._waited: dict[Any, Any] = {}  # CUDA stream -> the commit event it last waited for

    @contextmanager
    def reading(self, device: torch.device) -> Iterator[None]:
        """Around a call: no commit writes while it launches its work."""
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
            committed = self._committed
            if stream is not None and committed is not None:
                # a stream that waited for this commit stays behind it: wait once per commit
                if self._waited.get(stream) is not committed:
                    stream.wait_event(committed)
                    # after the wait is queued; a wait captured into a graph orders nothing
                    if not torch.cuda.is_current_stream_capturing():
                        self._waited[stream] = committed
            yield
            if stream is not None:
                self._record_call(stream)
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self, device: torch.device) -> Iterator[None]:
        """Around a commit (or a flip): no call runs meanwhile; on CUDA the writes wait for
        the calls already launched, and later calls wait for the writes."""
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            if device.type == "cuda":
                self.wait_for_calls(device)
            yield
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                self._committed = event
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def wait_for_calls(self, device: torch.device) -> None:
        """The current stream waits for every call launched so far (no host sync)."""
        stream = torch.cuda.current_stream(device)
        with self._cond:
            events = list(self._calls.values())
        for event in events:
            stream.wait_event(event)

    def _record_call(self, stream: Any) -> None:
        """Mark the end of this call's launches on its stream. One event per stream,
        recorded again each call: a wait on it waits for the latest record."""
        with self._cond:
            event = self._calls.get(stream)
            if event is None:
                event = self._calls[stream] = torch.cuda.Event()
            event.record(stream)
