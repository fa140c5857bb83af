"""Spawned ranks for the WeightSync tests: `launch(scenario)` runs `scenario(rank, world)` in
spawned processes (Gloo on CPU; NCCL when asked), each with a global deadline; processes
still alive then are killed. Plus the trainer and replicas every scenario shares.

Each replica recomputes the trainer's weights itself (same seeds, same deterministic steps)
and compares its engines with eager PyTorch on those weights, on fresh random inputs.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchrefit

from helpers import assert_matches, run_eager
from models import MLP

DEADLINE_S = 120  # three fresh interpreters importing torch on a loaded 2-core machine
TIMEOUT_S = 3.0  # each collective's timeout in the tests


def launch(
    scenario: Callable[..., dict[str, Any]],
    tmp_path: Path,
    world: int = 3,
    backend: str = "gloo",
    device_of: Callable[[int], int] | None = None,
) -> list[dict[str, Any]]:
    """Run `scenario(rank, world)` in `world` spawned processes; every rank's result dict.
    `device_of(rank)`: the GPU each rank uses (NCCL: its rank)."""
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'init'}"
    if device_of is None and backend == "nccl":
        device_of = _own_gpu
    procs = [
        ctx.Process(
            target=_entry,
            args=(scenario, rank, world, init, str(tmp_path), backend, device_of),
            daemon=True,
        )
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    assert not alive, f"{len(alive)} process(es) still running after {DEADLINE_S} s"
    results = []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"exited": True})
    return results


def _own_gpu(rank: int) -> int:
    return rank


def _entry(
    scenario: Callable[..., dict[str, Any]],
    rank: int,
    world: int,
    init: str,
    out: str,
    backend: str,
    device_of: Callable[[int], int] | None,
) -> None:
    torch.set_num_threads(1)
    try:
        if device_of is not None:
            torch.cuda.set_device(device_of(rank))
        dist.init_process_group(
            backend,
            init_method=init,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        result = scenario(rank, world)
    except BaseException as e:  # reported to the parent, which asserts on it
        result = {"crashed": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    tmp = Path(out) / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(Path(out) / f"rank{rank}.json")
    os._exit(0)  # no process-group teardown: a peer may be gone


def trainer(seed: int = 0) -> tuple[MLP, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MLP()
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def step(model: MLP, optimizer: torch.optim.Optimizer, n: int) -> None:
    """One deterministic SGD step: every rank that runs it gets the very same weights."""
    generator = torch.Generator().manual_seed(100 + n)
    x = torch.randn(8, 16, generator=generator).to(next(model.parameters()).device)
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def inputs(device: str = "cpu") -> torch.Tensor:
    return torch.randn(5, 16, device=device)


def replica(
    seed: int, device: str = "cpu", bf16: bool = False, **settings: Any
) -> torchrefit.CompiledModule:
    """Compiled from other weights than the trainer's (eager backend unless told)."""
    torch.manual_seed(50 + seed)
    model = MLP().to(device)
    if bf16:
        settings["dtype"] = "bfloat16"
    settings.setdefault("backend", "eager")
    return torchrefit.compile(model, (inputs(device),), **settings)


def check(compiled: torchrefit.CompiledModule, shadow: MLP, device: str = "cpu") -> float:
    """Outputs equal eager with the shadow weights, on fresh inputs; the max abs error."""
    x = inputs(device)
    got, want = compiled(x), run_eager(shadow, x)
    assert_matches(got, want)
    return float((got.float() - want).abs().max())
