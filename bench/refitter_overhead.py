"""Where a Refitter call's time goes on a GPU: the finiteness reduction, the guard, the
bound-tensor check, the graphs. ResNet-50-shaped weights (161 tensors, 51 MB float16).

    PYTHONPATH=$PWD/src python3 bench/refitter_overhead.py
"""

from __future__ import annotations

import json
import time

import torch

import torchrefit


def timed(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - started) / iters


def _enter_and_leave(guard) -> None:
    with guard.writing(torch.device("cuda")):
        pass


def main() -> None:
    import torchvision

    a = torchvision.models.resnet50().eval().cuda().half()
    b = torchvision.models.resnet50().eval().cuda().half()
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    weights = [t for t in b.state_dict().values() if t.is_floating_point()]
    refitter = torchrefit.Refitter(compiled, b)
    graphs = refitter._graphs
    out = {
        "refitter_call_us": timed(refitter),
        "check_bound_us": timed(refitter._check_bound),
        "compute_replay_us": timed(graphs.compute.replay),
        "foreach_norm_inf_us": timed(lambda: torch._foreach_norm(weights, float("inf"))),
        "foreach_norm_2_us": timed(lambda: torch._foreach_norm(weights, 2)),
        "guard_writing_us": timed(lambda: _enter_and_leave(refitter.state.guard)),
        "tensors": len(weights),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
