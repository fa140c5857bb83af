"""Inference throughput while a Refitter refits continuously, against no refits; and the time
from a refit call to the first call computing with the new weights. One process, one card.

    PYTHONPATH=$PWD/src python3 bench/concurrent_bench.py --device cuda --out $OUT
    python bench/concurrent_bench.py --device cpu --quick          # CPU smoke run

Inference runs on the main thread (CUDA graphs on a GPU), waiting for each result as a
server does; refits run on a second thread and, on a GPU, on a stream of their own. Each
configuration: plain refits (the commit excludes calls while it copies) and double-buffered
ones (copies go to the standby buffer, then a flip). Throughput is calls per second over a
fixed wall time, synchronized at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from typing import Any

import torch

import torchrefit

sys.path.insert(0, os.path.dirname(__file__))
from refit_bench import build, inputs, sync  # noqa: E402


def throughput(
    compiled: Any, x: tuple, device: str, seconds: float, refit: Any = None
) -> dict[str, float]:
    stop = threading.Event()
    refits = [0]

    def refitting() -> None:
        stream = torch.cuda.Stream() if device == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            i = 0
            while not stop.is_set():
                refit(i % 2)
                i += 1
                if stream is not None:
                    stream.synchronize()
        refits[0] = i

    worker = threading.Thread(target=refitting) if refit is not None else None
    if worker is not None:
        worker.start()
    sync(device)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        compiled(*x)
        sync(device)  # a server returns each result: no queue of launches holding the GIL
        calls += 1
    sync(device)
    elapsed = time.perf_counter() - started
    stop.set()
    if worker is not None:
        worker.join()
    return {"calls_per_s": calls / elapsed, "refits_per_s": refits[0] / elapsed}


def torn_calls(compiled: Any, x: tuple, outs: tuple, refit: Any, calls: int) -> int:
    """Calls during continuous refits whose output is neither weight set's, exactly."""
    stop = threading.Event()

    def refitting() -> None:
        i = 0
        while not stop.is_set():
            refit(i % 2)
            i += 1

    worker = threading.Thread(target=refitting)
    worker.start()
    torn = 0
    for _ in range(calls):
        y = compiled(*x)
        torn += not any(torch.equal(y, o) for o in outs)
    stop.set()
    worker.join()
    return torn


def first_call_after_refit_ms(
    compiled: Any, x: tuple, refit: Any, device: str, iters: int
) -> float:
    times = []
    for i in range(iters):
        sync(device)
        started = time.perf_counter()
        refit(i % 2)
        compiled(*x)
        sync(device)
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval: Python hands the GIL between the two threads this often",
    )
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    device, dtype = args.device, torch.float16 if args.device == "cuda" else torch.float32
    model = "tiny-bert" if args.quick else args.model
    a, b = build(model, 0, device, dtype), build(model, 1, device, dtype)
    x = inputs(model, device, dtype, 8 if not args.quick else 2)
    seconds = 0.5 if args.quick else args.seconds
    backend = "eager" if args.quick else "inductor"
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": model,
        "switch_interval_s": sys.getswitchinterval(),
    }
    with tempfile.TemporaryDirectory() as cache:
        for double_buffer in (False, True):
            compiled = torchrefit.compile(
                a,
                x,
                backend=backend,
                cuda_graphs=device == "cuda",
                double_buffer=double_buffer,
                cache_dir=cache,
            )
            refitters = (torchrefit.Refitter(compiled, b), torchrefit.Refitter(compiled, a))
            refitters[1]()
            out_a = compiled(*x).clone() if isinstance(compiled(*x), torch.Tensor) else None
            key = "double_buffer" if double_buffer else "plain"
            row: dict[str, Any] = {}
            row["alone"] = throughput(compiled, x, device, seconds)
            refit = refitters.__getitem__

            def call_refit(i: int, refit: Any = refit) -> None:
                refit(i)()

            row["during_refits"] = throughput(compiled, x, device, seconds, call_refit)
            row["throughput_ratio"] = (
                row["during_refits"]["calls_per_s"] / row["alone"]["calls_per_s"]
            )
            row["first_call_after_refit_ms"] = first_call_after_refit_ms(
                compiled, x, call_refit, device, 5 if args.quick else 50
            )
            if out_a is not None:
                refitters[0]()
                out_b = compiled(*x).clone()
                refitters[1]()
                row["torn_calls"] = torn_calls(
                    compiled, x, (out_a, out_b), call_refit, 50 if args.quick else 2000
                )
                row["checked_calls"] = 50 if args.quick else 2000
            results[key] = row
            print(key, json.dumps(row), flush=True)
    if args.out:
        with open(os.path.join(args.out, "concurrent.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
