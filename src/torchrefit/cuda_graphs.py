"""Replay a compiled module's call as a CUDA graph, one graph per input signature.

The graph reads the weight store in place: engine constants never move, so a refit (a copy
into them) is seen by every captured graph, and graphs stay valid across refits.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("torchrefit")

MAX_GRAPHS = 8  # input signatures kept; the least recently used is dropped
_MISSING = object()


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # static input buffers (tensors) or the non-tensor values
    outputs: list[torch.Tensor]


class CudaGraphs:
    """A call's graphs share their static input and output buffers: calls from several
    threads take turns (a lock from the input copy to the output copy), and a call on
    another stream than the last one waits for that stream's work first."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.captured: OrderedDict[tuple, _Captured | None] = OrderedDict()
        self._lock = threading.Lock()
        self._last: Any = None  # the stream of the last replay
        self._last_id: int | None = None

    def run(self, flat: list[Any]) -> list[Any]:
        # the module's guards fixed every input's dtype and device, and every other value
        key = tuple((x.shape, x.stride()) for x in flat if isinstance(x, torch.Tensor))
        with self._lock:
            captured = self.captured.get(key, _MISSING)
            if captured is _MISSING:
                captured = self.captured[key] = self._capture(flat)
                while len(self.captured) > MAX_GRAPHS:
                    self.captured.popitem(last=False)
            self.captured.move_to_end(key)
            if captured is None:  # this signature could not be captured: run as usual
                return list(self.call(*flat))
            assert isinstance(captured, _Captured)
            sid = torch._C._cuda_getCurrentStream(torch.cuda.current_device())[0]
            if sid != self._last_id:  # another stream: the last replay may still read them
                stream = torch.cuda.current_stream()
                if self._last is not None:
                    stream.wait_stream(self._last)
                self._last, self._last_id = stream, sid
            for buffer, x in zip(captured.inputs, flat, strict=True):
                if isinstance(buffer, torch.Tensor):
                    buffer.copy_(x)
            captured.graph.replay()
            return [y.clone() for y in captured.outputs]

    def _capture(self, flat: list[Any]) -> _Captured | None:
        inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):  # warm up: autotuning and lazy init stay out of the graph
                    self.call(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a refit on another thread (a host sync) does not break it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad():
                outputs = list(self.call(*inputs))
        except Exception as exc:  # an op that syncs with the host cannot be captured
            logger.warning("CUDA graph capture failed (%s); running without a graph", exc)
            return None
        if not all(isinstance(y, torch.Tensor) for y in outputs):
            return None
        return _Captured(graph, inputs, outputs)
