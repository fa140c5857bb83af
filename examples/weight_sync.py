"""One trainer, many replicas: a few SGD steps, each followed by a sync and a check.

    torchrun --nproc-per-node 3 examples/weight_sync.py            # CPU, Gloo
    torchrun --nproc-per-node 2 examples/weight_sync.py --cuda     # GPUs, NCCL

Rank 0 trains; every other rank serves a compiled copy and receives each update with one
broadcast per dtype, then refits through the refit core (all or nothing).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import torchrefit


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank = dist.get_rank()
    device = (
        torch.device("cuda", rank % torch.cuda.device_count()) if args.cuda else torch.device("cpu")
    )
    if args.cuda:
        torch.cuda.set_device(device)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(device)
    trainer = model().to(device)
    if rank == 0:
        sync = torchrefit.distributed.WeightSync(weights=trainer, src=0, timeout=60)
        opt = torch.optim.SGD(trainer.parameters(), lr=0.05)
    else:
        compiled = torchrefit.compile(
            model().to(device), (x,), backend="eager" if not args.cuda else "inductor"
        )
        sync = torchrefit.distributed.WeightSync(compiled=compiled, src=0, timeout=60)
    for step in range(args.steps):
        if rank == 0:
            trainer(torch.randn(8, 64, device=device)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        started = time.perf_counter()
        sync()
        elapsed = 1e3 * (time.perf_counter() - started)
        if rank != 0:  # eager PyTorch with the trainer's values, as received
            eager = model().to(device)
            eager.load_state_dict(dict(sync.views))
            with torch.no_grad():
                error = (compiled(x) - eager(x)).abs().max().item()
            print(
                f"rank {rank} step {step}: synced in {elapsed:.2f} ms, "
                f"max error vs eager {error:.2e}",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
