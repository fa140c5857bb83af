"""Control messages of a WeightSync over its process group, as data.

JSON in uint8 tensors (never a pickle), small int64 signals, and the timeouts that bound
every wait: a collective that fails or outlasts its time raises `GroupFailure`, which the
caller turns into a WeightSyncError that says what each rank did.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

import torch
import torch.distributed as dist

Timeout = datetime.timedelta | float | int | None


class GroupFailure(Exception):
    """A collective failed or timed out (a rank died or stalled); `what` names it."""

    def __init__(self, what: str, timeout: datetime.timedelta, cause: BaseException) -> None:
        super().__init__(f"{what} failed (timeout {timeout.total_seconds():g} s): {cause}")
        self.what = what


class Control:
    """The group's small messages, on the group's collective device."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.world = dist.get_world_size(group)

    def wait(self, works: list[Any], what: str, timeout: datetime.timedelta) -> None:
        """Wait for every collective within `timeout`; a failure raises GroupFailure."""
        deadline = time.monotonic() + timeout.total_seconds()
        try:
            for work in works:
                left = max(deadline - time.monotonic(), 1e-3)
                work.wait(datetime.timedelta(seconds=left))
        except RuntimeError as e:
            raise GroupFailure(what, timeout, e) from e

    def gather_json(
        self, payload: dict[str, Any], what: str, timeout: datetime.timedelta
    ) -> list[dict[str, Any]]:
        """Every rank's payload, in group rank order (two all_gathers: sizes, then bytes)."""
        data = _encode(payload, self.device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        self.wait([dist.all_gather(sizes, size, group=self.group, async_op=True)], what, timeout)
        longest = max(int(s.item()) for s in sizes)
        return self._gather_padded(data, longest, what, timeout)

    def gather_fixed(
        self, payload: dict[str, Any], size: int, what: str, timeout: datetime.timedelta
    ) -> list[dict[str, Any]]:
        """Every rank's payload in one all_gather of `size` bytes each (a longer payload is
        the caller's error)."""
        data = _encode(payload, self.device)
        if data.numel() > size:
            raise ValueError(f"a {data.numel()}-byte control message exceeds {size} bytes")
        return self._gather_padded(data, size, what, timeout)

    def _gather_padded(
        self, data: torch.Tensor, size: int, what: str, timeout: datetime.timedelta
    ) -> list[dict[str, Any]]:
        padded = torch.zeros(size, dtype=torch.uint8, device=self.device)
        padded[: data.numel()] = data
        chunks = [torch.empty_like(padded) for _ in range(self.world)]
        self.wait([dist.all_gather(chunks, padded, group=self.group, async_op=True)], what, timeout)
        return [_decode(c) for c in chunks]

    def signal(
        self, values: list[int], src: int, what: str, timeout: datetime.timedelta
    ) -> list[int]:
        """`values` broadcast from `src` (int64s; other ranks pass as many placeholders)."""
        message = torch.tensor(values, dtype=torch.int64, device=self.device)
        self.wait(
            [dist.broadcast(message, src=src, group=self.group, async_op=True)], what, timeout
        )
        return [int(v) for v in message.tolist()]


def _encode(payload: dict[str, Any], device: torch.device) -> torch.Tensor:
    raw = bytearray(json.dumps(payload).encode())
    return torch.frombuffer(raw, dtype=torch.uint8).to(device)


def _decode(chunk: torch.Tensor) -> dict[str, Any]:
    raw = bytes(chunk.cpu().numpy()).rstrip(b"\0")
    decoded = json.loads(raw)
    if not isinstance(decoded, dict):
        raise ValueError("a control message is not a JSON object")
    return decoded


def comm_device(group: Any) -> torch.device:
    """Where the group's collectives run: this rank's current GPU for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_timeout(timeout: Timeout, group: Any, device: torch.device) -> datetime.timedelta:
    """`timeout` as a timedelta; None: the group's own timeout (its backend's default when
    it cannot be read)."""
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout is not None:
        return datetime.timedelta(seconds=float(timeout))
    try:
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return dist.distributed_c10d._get_default_timeout(
            dist.Backend(str(dist.get_backend(group)))
        )


class Laps:
    """Milliseconds per stage of one sync, and the total."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = 1e3 * (now - self.last)
        self.last = now

    def done(self) -> dict[str, float]:
        return {**self.ms, "total": 1e3 * (time.perf_counter() - self.started)}
