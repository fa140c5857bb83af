"""One trainer refits many compiled replicas over torch.distributed.

    torchrun --nproc-per-node 3 examples/weight_sync.py              # CPU, Gloo: shared memory
    torchrun --nproc-per-node 2 examples/weight_sync.py --colocated  # both ranks on cuda:0: IPC
    torchrun --nproc-per-node 2 examples/weight_sync.py --cuda       # one GPU per rank, NCCL
    ... --transport collective                                       # broadcast all the same

Rank 0 trains an MLP with SGD; every other rank serves it compiled (the last rank in
bfloat16). Replicas on the trainer's host (and GPU) read its send buffer where it lies: a
memfd on the CPU, the trainer's GPU memory through CUDA IPC with --colocated (the layout of
colocated RL: trainer and engine processes on one GPU); the others receive broadcasts.
After each step the trainer syncs, then sends a probe input and its own eager output, and
every replica prints how far its engines are from it.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import torchrefit
from torchrefit.distributed import WeightSync


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 8)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    parser.add_argument("--colocated", action="store_true", help="every rank on cuda:0, Gloo")
    parser.add_argument("--transport", default="auto", choices=("auto", "collective", "shared"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--backend", default="inductor", help="engine backend of the replicas")
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = args.cuda or args.colocated
    device = torch.device("cuda", 0 if args.colocated else local) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    # NCCL takes one GPU per rank; ranks sharing one GPU talk through Gloo
    dist.init_process_group("nccl" if args.cuda and not args.colocated else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # the replicas start from other weights than the trainer's
    model = mlp(args.width).to(device)
    probe = torch.randn(16, 64, device=device)
    if rank == 0:
        sync = WeightSync(weights=model, timeout=60, transport=args.transport)
        sync.rehome()  # the parameters live in the send buffer: a sync copies nothing first
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        dtype = "bfloat16" if rank == world - 1 and world > 2 else None
        compiled = torchrefit.compile(model, (probe,), backend=args.backend, dtype=dtype)
        sync = WeightSync(compiled=compiled, timeout=60, transport=args.transport)
    if rank == 0:
        print(f"shared with ranks {sync.routes.shared}, broadcast to {sync.routes.collective}")
    for step in range(args.steps):
        if rank == 0:
            loss = model(torch.randn(32, 64, device=device)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        dist.barrier()
        started = time.perf_counter()
        sync()  # every rank raises WeightSyncError if any replica refused the update
        if gpu:
            torch.cuda.synchronize()
        sync_ms = 1e3 * (time.perf_counter() - started)
        check(rank, model if rank == 0 else compiled, probe, step, sync_ms)
    dist.barrier()
    dist.destroy_process_group()


def check(rank: int, module: nn.Module, probe: torch.Tensor, step: int, sync_ms: float) -> None:
    """The trainer's probe input and eager output to every replica, which compares."""
    wire = probe.device if dist.get_backend() == "nccl" else torch.device("cpu")
    with torch.no_grad():
        if rank == 0:
            probe.normal_()
        sent = probe.to(wire)
        dist.broadcast(sent, src=0)
        probe.copy_(sent)
        expected = module(probe).to(wire) if rank == 0 else torch.empty(probe.shape[0], 8).to(wire)
        dist.broadcast(expected, src=0)
        expected = expected.to(probe.device)
        if rank == 0:
            print(f"step {step}: trainer synced in {sync_ms:.2f} ms", flush=True)
            return
        engines = module.settings.dtype or "float32"
        error = (module(probe).float() - expected).abs().max().item()
        print(
            f"step {step}: rank {rank} ({engines} engines) synced in {sync_ms:.2f} ms, "
            f"max error vs eager {error:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
