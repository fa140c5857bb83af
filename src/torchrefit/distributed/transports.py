"""How the payload travels: who shares the source's buffer, and the buffers of each rank.

At construction every rank describes where it runs (host, process, device, GPU UUID) as
data. A replica on the source's host (and, when the source's weights are on a GPU, on that
GPU) may share: the source makes one send buffer in shared memory (host memory in a memfd,
or a CUDA allocation exported by IPC) and each such replica opens it once and refits from
views of it. Every other replica gets the payload by broadcast into a receive buffer of its
own: over the group, or, when the group mixes both, over a subgroup of the source and those
replicas. The send buffer starts with a header page (a token that proves a mapping is the
source's memory); each dtype's buffer follows, page-aligned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..export import parse_dtype
from . import cuda_ipc, segments
from .layout import Layout

TRANSPORTS = ("auto", "collective", "shared")


def where(device: torch.device) -> dict[str, Any]:
    """This rank's place, as data: host, process, the device its weights are on."""
    uuid = ""
    if device.type == "cuda":
        try:
            uuid = cuda_ipc.device_uuid(device)
        except (RuntimeError, AttributeError):
            uuid = ""
    return {
        "host": segments.host_identity(),
        "pid": os.getpid(),
        "device": device.type,
        "uuid": uuid,
        "memfd": segments.supported(),
    }


def share_reasons(described: list[dict[str, Any]], src: int, comm: torch.device) -> dict[int, str]:
    """Per replica rank: "" if it may share the source's send buffer, else why it may not.
    Every rank computes the same answer from the same descriptions."""
    source = next(d for d in described if d["rank"] == src)
    reasons = {}
    for d in described:
        if d["role"] == "replica":
            reasons[d["rank"]] = _reason(source, d, comm)
    return reasons


def _reason(source: dict[str, Any], replica: dict[str, Any], comm: torch.device) -> str:
    rank = replica["rank"]
    if source["transport"] == "collective":
        return f"the source (rank {source['rank']}) asked for transport='collective'"
    if replica["transport"] == "collective":
        return f"rank {rank} asked for transport='collective'"
    if replica["host"] != source["host"]:
        return f"rank {rank} runs on another host ({replica['host']}) than the source"
    if not (source["memfd"] and replica["memfd"]):
        return "memfd_create or /proc is missing on this platform"
    if source["device"] == "cpu" and comm.type == "cuda":
        return "the source's weights are on the host, and NCCL sends from GPUs"
    if source["device"] == "cuda" and (
        replica["device"] != "cuda" or not source["uuid"] or replica["uuid"] != source["uuid"]
    ):
        return (
            f"the source's weights are on GPU {source['uuid'] or '(unknown)'}, rank {rank}'s "
            f"engines on {replica['device']} {replica['uuid']}: CUDA IPC shares within one GPU"
        )
    if source["device"] not in ("cpu", "cuda"):
        return f"the source's weights are on {source['device']}, which cannot be shared"
    return ""


def data_offsets(layout: Layout) -> tuple[dict[str, int], int]:
    """Byte offset of each dtype's buffer in the shared send buffer, and its whole size."""
    offsets, end = {}, segments.PAGE  # the header page: the token
    for dtype, n in layout.sizes.items():
        offsets[dtype] = end
        end = segments.align(end + max(n, 1) * parse_dtype(dtype).itemsize)
    return offsets, end


def typed(data: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The per-dtype buffers over the shared send buffer's bytes."""
    offsets, _ = data_offsets(layout)
    buffers = {}
    for dtype, n in layout.sizes.items():
        width = max(n, 1) * parse_dtype(dtype).itemsize
        buffers[dtype] = data[offsets[dtype] : offsets[dtype] + width].view(parse_dtype(dtype))
    return buffers


@dataclass
class SharedSend:
    """The source's shared send buffer: a memfd (the board, and the data when on the host),
    plus a CUDA allocation and an interprocess event when the weights are on a GPU."""

    segment: segments.Segment
    data: torch.Tensor
    buffers: dict[str, torch.Tensor]
    event: Any = None  # torch.cuda.Event(interprocess=True)
    cuda_handle: bytes = b""

    @staticmethod
    def make(layout: Layout, device: torch.device, world: int) -> SharedSend:
        _, total = data_offsets(layout)
        on_gpu = device.type == "cuda"
        segment = segments.Segment(world, 0 if on_gpu else total)
        event, handle = None, b""
        if on_gpu:
            data, handle = cuda_ipc.allocate(total, device)
            with torch.cuda.device(device):
                event = torch.cuda.Event(interprocess=True)
        else:
            assert segment.data is not None
            data = segment.data
        data[: segments.TOKEN_BYTES].copy_(
            torch.frombuffer(bytearray(segment.token), dtype=torch.uint8)
        )
        return SharedSend(segment, data, typed(data, layout), event, handle)

    def offer(self) -> dict[str, Any]:
        offer = self.segment.offer()
        if self.event is not None:
            with torch.cuda.device(self.data.device):
                offer["cuda"] = {
                    "handle": self.cuda_handle.hex(),
                    "bytes": self.data.numel(),
                    "event": bytes(self.event.ipc_handle()).hex(),
                }
        return offer

    def publish(self) -> None:
        """After packing: the replicas' reads wait for the work queued so far (the trainer's
        step, the packing copy) on this stream, without a host sync."""
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(self.data.device))


@dataclass
class SharedReceive:
    """A replica's view of the source's send buffer, opened once."""

    opened: segments.Opened
    buffers: dict[str, torch.Tensor]
    event: Any = None

    @staticmethod
    def open(
        offer: dict[str, Any], layout: Layout, world: int, device: torch.device
    ) -> SharedReceive:
        """Map the source's buffer; segments.Unavailable or cuda_ipc.Unavailable if not here."""
        opened = segments.open_offer(offer, world)
        cuda, event = offer.get("cuda"), None
        if cuda is not None:
            if device.type != "cuda":
                raise cuda_ipc.Unavailable("the source's weights are on a GPU, this rank's not")
            data = cuda_ipc.open_handle(bytes.fromhex(cuda["handle"]), int(cuda["bytes"]), device)
            event = torch.cuda.Event.from_ipc_handle(device, bytes.fromhex(cuda["event"]))
        else:
            assert opened.data is not None
            data = opened.data
        if segments.token_of(data) != bytes.fromhex(offer["token"]):
            raise segments.Unavailable("the mapped send buffer holds another token")
        return SharedReceive(opened, typed(data, layout), event)

    def wait(self, stream: Any) -> None:
        """`stream` (the replica's refit stream) waits for what the source queued before
        publishing; no host sync."""
        if self.event is not None:
            stream.wait_event(self.event)


@dataclass
class Routes:
    """Who gets the payload how, the same on every rank once agreed."""

    shared: list[int] = field(default_factory=list)  # replica ranks that share
    collective: list[int] = field(default_factory=list)  # replica ranks that receive broadcasts
    reasons: dict[int, str] = field(default_factory=dict)  # collective rank -> why not shared


def data_group(group: Any, src: int, routes: Routes, rank: int) -> Any:
    """The group the payload is broadcast over: the group itself when no replica shares,
    None when every replica shares, else a subgroup of the source and the collective
    replicas (made by its members only)."""
    if not routes.collective:
        return None
    if not routes.shared:
        return group
    members = sorted([src, *routes.collective])
    if rank not in members:
        return None
    return dist.new_group(
        members, backend=str(dist.get_backend(group)), use_local_synchronization=True
    )
