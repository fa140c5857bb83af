"""Host shared memory for a WeightSync: one anonymous memory file (memfd) that the source
makes and the replicas of its host open once, through /proc/<pid>/fd/<n>.

A memfd has no name in /dev/shm, so nothing can leak: the kernel frees it when the last
process that maps it exits, a kill -9 included. It starts with a board (a magic, a random
token that proves to a replica it opened the source's memory and not another host's, and
one slot per rank: the last update that replica finished reading, and how), followed by
the send buffer when the source's weights are on the host. Replicas map the board read-write
and the buffer read-only: a replica cannot write into the trainer's weights.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAGIC = b"TRFSYNC1"
TOKEN_BYTES = 16
PAGE = mmap.ALLOCATIONGRANULARITY
_SLOTS_AT = 64  # bytes: magic, token, then one int64 slot per group rank
# a slot holds version * 4 + how: one aligned 8-byte store, read whole by other processes
DONE_APPLIED, DONE_REFUSED = 1, 2


class Unavailable(Exception):
    """Shared memory cannot be used here; the message says why (a fallback's reason)."""


def host_identity() -> str:
    """This host as data: its name and boot id (two containers with one hostname on two
    machines differ in boot id; the token check settles the rest)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def supported() -> bool:
    return hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir()


def align(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


@dataclass
class Board:
    """The per-rank slots of the shared segment (int64, one per group rank)."""

    slots: torch.Tensor

    def mark(self, index: int, version: int, how: int) -> None:
        self.slots[index] = version * 4 + how

    def read(self, index: int) -> tuple[int, int]:
        value = int(self.slots[index])
        return value // 4, value % 4

    def settle(self, index: int, pid: int, version: int, deadline: float) -> int:
        """How the replica in slot `index` (process `pid`) finished update `version`, once
        it has: DONE_APPLIED or DONE_REFUSED; 0 if its process died first, -1 if `deadline`
        (time.monotonic) passed first."""
        while True:
            done, how = self.read(index)
            if done == version:
                return how
            if not alive(pid):
                return 0
            if time.monotonic() >= deadline:
                return -1
            time.sleep(1e-3)


class Segment:
    """The source's side: made once, its fd kept open until every replica has opened it."""

    def __init__(self, world: int, data_bytes: int) -> None:
        if not supported():
            raise Unavailable("this platform has no memfd_create or /proc/self/fd")
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.board_bytes = align(_SLOTS_AT + 8 * world)
        self.data_bytes = data_bytes
        size = self.board_bytes + data_bytes
        self.fd = os.memfd_create("torchrefit-weight-sync", os.MFD_CLOEXEC)
        self._close = weakref.finalize(self, os.close, self.fd)  # once, whichever comes first
        try:
            os.ftruncate(self.fd, size)
            os.posix_fallocate(self.fd, 0, size)  # no memory: an error now, not SIGBUS later
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED | _POPULATE)
        except OSError as e:
            self._close()
            raise Unavailable(f"could not make {size} bytes of shared memory: {e}") from e
        self.map[: len(MAGIC)] = MAGIC
        self.map[len(MAGIC) : len(MAGIC) + TOKEN_BYTES] = self.token
        whole = torch.frombuffer(self.map, dtype=torch.uint8)
        self.board = Board(whole[_SLOTS_AT : _SLOTS_AT + 8 * world].view(torch.int64))
        self.data = whole[self.board_bytes :] if data_bytes else None

    def offer(self) -> dict[str, Any]:
        """What a replica of this host needs to open the segment, as data."""
        return {
            "pid": os.getpid(),
            "fd": self.fd,
            "token": self.token.hex(),
            "board_bytes": self.board_bytes,
            "data_bytes": self.data_bytes,
        }

    def close_fd(self) -> None:
        """Once every replica has opened it: the mappings keep the memory."""
        self._close()


@dataclass
class Opened:
    """A replica's side: the board (read-write) and the send buffer (read-only, or None)."""

    board: Board
    data: torch.Tensor | None


def open_offer(offer: dict[str, Any], world: int) -> Opened:
    """Map the source's segment; Unavailable if this process cannot reach it."""
    path = f"/proc/{int(offer['pid'])}/fd/{int(offer['fd'])}"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise Unavailable(f"cannot open the source's shared memory ({path}): {e}") from e
    try:
        board_bytes, data_bytes = int(offer["board_bytes"]), int(offer["data_bytes"])
        if os.fstat(fd).st_size != board_bytes + data_bytes:
            raise Unavailable(f"{path} is not the source's shared memory (another size)")
        board_map = mmap.mmap(fd, board_bytes, mmap.MAP_SHARED)
        if board_map[: len(MAGIC) + TOKEN_BYTES] != MAGIC + bytes.fromhex(offer["token"]):
            raise Unavailable(f"{path} is not the source's shared memory (another token)")
        data = None
        if data_bytes:
            data_map = mmap.mmap(
                fd, data_bytes, mmap.MAP_SHARED | _POPULATE, mmap.PROT_READ, offset=board_bytes
            )
            with warnings.catch_warnings():  # read-only on purpose: torch warns it is so
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(data_map, dtype=torch.uint8)
    except OSError as e:
        raise Unavailable(f"cannot map the source's shared memory ({path}): {e}") from e
    finally:
        os.close(fd)
    board = torch.frombuffer(board_map, dtype=torch.uint8)[_SLOTS_AT : _SLOTS_AT + 8 * world]
    return Opened(Board(board.view(torch.int64)), data)


def token_of(data: torch.Tensor) -> bytes:
    """The token a send buffer's header holds (its first bytes)."""
    return bytes(data[:TOKEN_BYTES].cpu().numpy())


def alive(pid: int) -> bool:
    """Whether process `pid` (of this host) still runs: not gone, not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[:1]
    return state not in (["Z"], ["X"])


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in now, not at the first sync
