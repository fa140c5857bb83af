"""What keeps calls and refits of one module apart: every call computes with one complete
weight set, and refits of one module run one at a time.

`Guard` is a readers-writer lock (calls read, the commit writes; a waiting writer goes
first, so refits are not starved by a stream of calls) and a mutex that serializes whole
refits. On CUDA it also orders the GPU work without a device-wide sync: a commit's stream
waits for the work already queued on every stream that made calls, and a call's stream
waits (once per commit) for the last commit's writes.

A call's cost is what the hot path can afford: two acquisitions of a plain lock and, on
CUDA, one look-up of the current stream; no event is recorded per call (a commit records
one on each calling stream instead, when it needs them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def stream_of(device: torch.device) -> int:
    """The current CUDA stream's id on `device` (no Stream object is made)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch._C._cuda_getCurrentStream(index)[0])


class Guard:
    def __init__(self) -> None:
        self.refit = threading.RLock()  # held for a whole refit: read .. commit
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._streams: dict[int, Any] = {}  # CUDA stream id -> Stream, of streams that called
        # since the last commit
        self._committed: Any = None  # CUDA event recorded after each commit's writes
        self._commits = 0
        self._waited: dict[int, int] = {}  # CUDA stream id -> the commit it last waited for

    # -- calls ------------------------------------------------------------------------------

    def begin_read(self, device: torch.device) -> None:
        """Before a call launches its work: no commit writes meanwhile; on CUDA the call's
        stream waits for the last commit's writes (once per commit). End with `end_read`."""
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        if device.type != "cuda":
            return
        try:
            self._follow_commits(device)
        except BaseException:
            self.end_read()
            raise

    def _follow_commits(self, device: torch.device) -> None:
        sid = stream_of(device)
        stream = self._streams.get(sid)
        if stream is None:
            stream = self._streams[sid] = torch.cuda.current_stream(device)
        if self._commits and self._waited.get(sid) != self._commits:
            stream.wait_event(self._committed)
            # a wait captured into a graph orders nothing later: remember only real ones
            if not torch.cuda.is_current_stream_capturing():
                self._waited[sid] = self._commits

    def end_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextmanager
    def reading(self, device: torch.device) -> Iterator[None]:
        """Around a call (`begin_read` .. `end_read`)."""
        self.begin_read(device)
        try:
            yield
        finally:
            self.end_read()

    # -- commits ----------------------------------------------------------------------------

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
                self.after_commits(device)
                self.wait_for_calls(device)
            yield
            if device.type == "cuda":
                if self._committed is None:
                    self._committed = torch.cuda.Event()
                self._committed.record(torch.cuda.current_stream(device))
                self._commits += 1
                # the writes came after every caller's queued work, and later writes wait
                # for this commit: only streams that call from now on need waiting for (a
                # stream per request never piles up)
                self._streams.clear()
                self._waited.clear()
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def after_commits(self, device: torch.device) -> None:
        """The current stream waits for the last commit's writes (no host sync): commits
        from refits on other streams stay in order, and so do the tables they share."""
        if self._committed is not None:
            torch.cuda.current_stream(device).wait_event(self._committed)

    def wait_for_calls(self, device: torch.device) -> None:
        """The current stream waits for the work queued so far on every stream that made
        calls (no host sync)."""
        current = stream_of(device)
        streams = [s for sid, s in list(self._streams.items()) if sid != current]
        if streams:
            stream = torch.cuda.current_stream(device)
            for other in streams:
                stream.wait_stream(other)
