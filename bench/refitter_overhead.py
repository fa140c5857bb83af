"""What a Refitter call costs next to a flat copy of the same bytes, side by side on one
model: unchecked, checked plain (a read before the first write, then the copy), checked
double-buffered (the check fused into the copy into the standby), and both checks again
with torch's reductions in place of the check kernel. `--resnet`: where a call's time goes
on ResNet-50-shaped weights (the reduction, the guard, the bound-tensor check, the graphs).

    PYTHONPATH=$PWD/src python3 bench/refitter_overhead.py            # GPU: 18 x 8192^2 bf16
    PYTHONPATH=$PWD/src python3 bench/refitter_overhead.py --tiny     # CPU smoke run
    PYTHONPATH=$PWD/src python3 bench/refitter_overhead.py --resnet   # GPU, needs torchvision

Times are medians of synchronized wall clocks (what a caller waits for), after warm-up.
Each Refitter's refit is checked against eager afterwards. Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from refit_bench import median_ms  # the bench scripts' shared timing

import torchrefit
from torchrefit.refit.verify import relative_error

# -- timing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def finite_kernel_off() -> Iterator[None]:
    """The check through torch's reductions (`TORCHREFIT_FINITE_KERNEL=0`): the old path."""
    os.environ["TORCHREFIT_FINITE_KERNEL"] = "0"
    try:
        yield
    finally:
        del os.environ["TORCHREFIT_FINITE_KERNEL"]


# -- the check's cost -----------------------------------------------------------------------


def linear_stack(width: int, layers: int, seed: int, device: str, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return model.eval().to(device, dtype)


def flat_copy_ms(nbytes: int, device: str, iters: int) -> float:
    """The floor: one copy_ of `nbytes` between two flat buffers on the device."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), device, iters=iters)


def check_cost(device: str, dtype: torch.dtype, width: int, layers: int, iters: int) -> dict:
    """One row: each way of refitting the same model from the same trainer tensors."""
    a = linear_stack(width, layers, 0, device, dtype)
    b = linear_stack(width, layers, 1, device, dtype)
    x = torch.randn(8, width, device=device, dtype=dtype)
    plain = torchrefit.compile(a, (x,), backend="eager")
    double = torchrefit.compile(a, (x,), backend="eager", double_buffer=True)
    del a
    nbytes = plain._torchrefit.store.nbytes()
    row: dict[str, Any] = {"device": device, "dtype": str(dtype), "weights_MB": nbytes / 1e6}
    row["flat_copy_ms"] = flat_copy_ms(nbytes, device, iters)
    with torch.no_grad():
        expected = b(x)

    def timed(label: str, module: torchrefit.CompiledModule, **options: Any) -> None:
        refitter = torchrefit.Refitter(module, b, **options)
        row[f"{label}_ms"] = median_ms(refitter, device, iters=iters)
        with torch.no_grad():
            row[f"err_{label}"] = relative_error(module(x), expected)
        graphs = refitter._graphs
        if label == "refitter_checked" and graphs is not None and graphs.check is not None:
            check = graphs.check[1]
            row["check_graph_ms"] = median_ms(check.replay, device, iters=iters)
            row["check_GBps"] = nbytes / row["check_graph_ms"] / 1e6

    timed("refitter_unchecked", plain, check_finite=False)
    timed("refitter_checked", plain)
    timed("refitter_checked_double_buffer", double)
    if device == "cuda":  # the same checks through torch's reductions, for comparison
        with finite_kernel_off():
            timed("refitter_checked_torch", plain)
            timed("refitter_checked_double_buffer_torch", double)
    for key in [k for k in row if k.startswith("refitter_") and k.endswith("_ms")]:
        row[key.removesuffix("_ms") + "_x_copy"] = row[key] / row["flat_copy_ms"]
    return row


ROWS = [
    ("flat_copy", "flat copy of the weight bytes (one copy_)"),
    ("refitter_unchecked", "Refitter, check_finite=False"),
    ("refitter_checked", "Refitter, checked, plain (a read, then the copy)"),
    ("refitter_checked_double_buffer", "Refitter, checked, double_buffer (checked as copied)"),
    ("refitter_checked_torch", "Refitter, checked, plain, torch reductions"),
    ("refitter_checked_double_buffer_torch", "Refitter, checked, double_buffer, torch reductions"),
    ("check_graph", "the plain check alone (its captured graph)"),
]


def table(row: dict[str, Any]) -> str:
    lines = ["| | ms | x flat copy |", "|---|---|---|"]
    for key, label in ROWS:
        if f"{key}_ms" in row:
            ratio = row[f"{key}_ms"] / row["flat_copy_ms"]
            lines.append(f"| {label} | {row[f'{key}_ms']:.3f} | {ratio:.2f} |")
    if "check_GBps" in row:
        lines.append(f"| the plain check's read (GB/s) | {row['check_GBps']:.0f} | |")
    for key in sorted(k for k in row if k.startswith("err_")):
        lines.append(f"| check: rel. error vs eager, {key[4:]} | {row[key]:.1e} | |")
    return "\n".join(lines)


# -- where a ResNet-50 call's time goes -----------------------------------------------------


def timed_us(fn: Callable[[], Any], iters: int = 200) -> float:
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


def breakdown() -> dict[str, Any]:
    import torchvision

    a = torchvision.models.resnet50().eval().cuda().half()
    b = torchvision.models.resnet50().eval().cuda().half()
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    weights = [t for t in b.state_dict().values() if t.is_floating_point()]
    refitter = torchrefit.Refitter(compiled, b)
    graphs = refitter._graphs
    assert graphs is not None and graphs.check is not None
    return {
        "refitter_call_us": timed_us(refitter),
        "check_bound_us": timed_us(refitter._check_bound),
        "compute_replay_us": timed_us(graphs.compute.replay),
        "check_replay_us": timed_us(graphs.check[1].replay),
        "foreach_norm_inf_us": timed_us(lambda: torch._foreach_norm(weights, float("inf"))),
        "foreach_norm_2_us": timed_us(lambda: torch._foreach_norm(weights, 2)),
        "guard_writing_us": timed_us(lambda: _enter_and_leave(refitter.state.guard)),
        "tensors": len(weights),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small model, a few iterations")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--resnet", action="store_true", help="the ResNet-50 breakdown instead")
    args = parser.parse_args()
    if args.resnet:
        print(json.dumps(breakdown()), flush=True)
        return
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    width, layers, iters = (64, 3, 5) if args.tiny else (args.width, args.layers, args.iters)
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    row = check_cost(device, dtype, width, layers, iters)
    print(json.dumps(row), flush=True)
    print(f"{card}, torch {torch.__version__}, {layers} x Linear({width}, {width}), ", end="")
    print(f"{str(dtype).removeprefix('torch.')}, {row['weights_MB']:.1f} MB\n")
    print(table(row))


if __name__ == "__main__":
    main()
