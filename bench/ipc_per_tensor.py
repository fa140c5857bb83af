"""The per-tensor CUDA IPC way of colocated RL frameworks (SGLang's update_weights_from_tensor,
vLLM's collective_rpc + load_weights), as a baseline for bench/weight_sync_bench.py.

Every update, the trainer exports each tensor anew through torch's CUDA IPC reduction (the
storage's IPC handle, its reference-count file and event) and sends it, one tensor at a
time; the server rebuilds each tensor from its handle (torch caches opened handles) and
copies it into its model's parameter. The frameworks pickle the reduction; here its fields
travel as JSON over the group (bytes as hex), so nothing is unpickled either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor


def per_tensor_ipc(model: torch.nn.Module, rank: int) -> Callable[[], None]:
    """Each update: per tensor, a fresh IPC export on rank 0, one message, a rebuild and a
    copy into the model on every other rank; then the trainer releases what it sent."""
    names = sorted(model.state_dict())

    def run() -> None:
        current = model.state_dict()
        for name in names:
            fields = _encode(current[name]) if rank == 0 else None
            received = _send(fields)
            if rank != 0:
                with torch.no_grad():
                    current[name].copy_(_decode(received))
        torch.cuda.synchronize()
        dist.barrier()  # the server has copied every tensor: the trainer may reuse them
        if rank == 0:
            torch.cuda.ipc_collect()

    return run


def _encode(tensor: torch.Tensor) -> list[Any]:
    _, args = reduce_tensor(tensor.detach())
    encoded: list[Any] = []
    for arg in args:
        if isinstance(arg, type):
            encoded.append({"type": "storage" if "Storage" in arg.__name__ else "tensor"})
        elif isinstance(arg, torch.dtype):
            encoded.append({"dtype": str(arg).removeprefix("torch.")})
        elif isinstance(arg, bytes):
            encoded.append({"bytes": arg.hex()})
        elif isinstance(arg, torch.Size | tuple):
            encoded.append({"tuple": list(arg)})
        else:
            encoded.append(arg)  # ints, bools, None
    return encoded


def _decode(fields: list[Any]) -> torch.Tensor:
    args: list[Any] = []
    for f in fields:
        if isinstance(f, dict) and "type" in f:
            args.append(torch.storage.TypedStorage if f["type"] == "storage" else torch.Tensor)
        elif isinstance(f, dict) and "dtype" in f:
            args.append(getattr(torch, f["dtype"]))
        elif isinstance(f, dict) and "bytes" in f:
            args.append(bytes.fromhex(f["bytes"]))
        elif isinstance(f, dict) and "tuple" in f:
            args.append(tuple(f["tuple"]))
        else:
            args.append(f)
    return rebuild_cuda_tensor(*args)


def _send(fields: list[Any] | None) -> list[Any]:
    """Rank 0's fields to every rank: a length, then the JSON bytes (two small broadcasts)."""
    data = json.dumps(fields).encode() if fields is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
    if data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.numpy()))  # type: ignore[no-any-return]
