"""One trainer refits many compiled replicas over torch.distributed, one broadcast per dtype.

    torchrun --nproc-per-node 3 examples/weight_sync.py            # CPU, Gloo
    torchrun --nproc-per-node 2 examples/weight_sync.py --cuda     # one GPU per rank, NCCL

Rank 0 trains an MLP with SGD; every other rank serves it compiled (the last rank in
bfloat16). After each step the trainer syncs, then sends a probe input and its own eager
output, and every replica prints how far its engines are from it.
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
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--backend", default="inductor", help="engine backend of the replicas")
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # the replicas start from other weights than the trainer's
    model = mlp(args.width).to(device)
    probe = torch.randn(16, 64, device=device)
    if rank == 0:
        sync = WeightSync(weights=model, timeout=60)
        sync.rehome()  # the parameters live in the send buffer: a sync copies nothing first
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        dtype = "bfloat16" if rank == world - 1 and world > 2 else None
        compiled = torchrefit.compile(model, (probe,), backend=args.backend, dtype=dtype)
        sync = WeightSync(compiled=compiled, timeout=60)
    for step in range(args.steps):
        if rank == 0:
            loss = model(torch.randn(32, 64, device=device)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        dist.barrier()
        started = time.perf_counter()
        sync()
        if args.cuda:
            torch.cuda.synchronize()
        sync_ms = 1e3 * (time.perf_counter() - started)
        check(rank, model if rank == 0 else compiled, probe, step, sync_ms)
    dist.barrier()
    dist.destroy_process_group()


def check(rank: int, module: nn.Module, probe: torch.Tensor, step: int, sync_ms: float) -> None:
    """The trainer's probe input and eager output to every replica, which compares."""
    with torch.no_grad():
        if rank == 0:
            probe.normal_()
        dist.broadcast(probe, src=0)
        expected = (
            module(probe) if rank == 0 else torch.empty(probe.shape[0], 8, device=probe.device)
        )
        dist.broadcast(expected, src=0)
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
