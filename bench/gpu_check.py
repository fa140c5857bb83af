"""Compile + refit on CUDA in float16 for torchvision's ResNet-50 and transformers' BERT-base,
checked against eager PyTorch, with save -> load -> refit in a fresh process.

    PYTHONPATH=src python bench/gpu_check.py --out DIR

Prints a markdown table; writes results.json and the table under DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import torchrefit

sys.path.insert(0, os.path.dirname(__file__))
import refit_bench  # noqa: E402

from torchrefit.refit.verify import relative_error

DEVICE = "cuda"
DTYPE = torch.float16


def build(name: str, seed: int) -> torch.nn.Module:
    return refit_bench.build("bert-base" if name != "resnet50" else name, seed, DEVICE, DTYPE)


def inputs(name: str, batch: int = 8) -> tuple[torch.Tensor, ...]:
    if name == "resnet50":
        return (torch.randn(batch, 3, 224, 224, device=DEVICE, dtype=DTYPE),)
    return (torch.randint(0, 30522, (batch, 128), device=DEVICE),)


def error(actual, expected) -> float:
    a = [t for t in torch.utils._pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    e = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    return max(relative_error(x, y) for x, y in zip(a, e, strict=True))


def cuda_median_ms(fn, warmup: int = 5, iters: int = 30) -> float:
    return refit_bench.event_ms(fn, "cuda", warmup, iters)


def wall_median_ms(fn, iters: int = 10) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def check_model(name: str, out_dir: str) -> dict:
    row: dict = {"model": name}
    a, b = build(name, 0), build(name, 1)
    row["weights_mb"] = sum(p.numel() * p.element_size() for p in a.state_dict().values()) / 1e6
    t = time.perf_counter()
    compiled = torchrefit.compile(a, inputs(name))
    row["compile_s"] = time.perf_counter() - t
    row["engines"] = len(compiled.engines())
    row["fallbacks"] = len(compiled.fallbacks())
    with torch.no_grad():
        x = inputs(name)
        row["err_A"] = error(compiled(*x), a(*x))
        row["eager_ms"] = cuda_median_ms(lambda: a(*x))
        row["torchrefit_ms"] = cuda_median_ms(lambda: compiled(*x))
        row["refit_module_ms"] = wall_median_ms(
            lambda: torchrefit.refit_module_weights(compiled, b, in_place=True)
        )
        x = inputs(name)
        row["err_B_after_module_refit"] = error(compiled(*x), b(*x))
        row["A_vs_B_err"] = error(a(*x), b(*x))  # proves the weights differ
        ep_a = torch.export.export(a, inputs(name))
        t = time.perf_counter()
        torchrefit.refit_module_weights(compiled, ep_a, in_place=True)
        torch.cuda.synchronize()
        row["refit_ep_fast_ms"] = 1e3 * (time.perf_counter() - t)
        x = inputs(name)
        row["err_A_after_ep_refit"] = error(compiled(*x), a(*x))
        t = time.perf_counter()
        torchrefit.refit_module_weights(compiled, ep_a, in_place=True, use_weight_map_cache=False)
        torch.cuda.synchronize()
        row["refit_ep_slow_ms"] = 1e3 * (time.perf_counter() - t)
        torchrefit.refit_module_weights(compiled, b, in_place=True)
    path = os.path.join(out_dir, f"{name}.trf")
    t = time.perf_counter()
    torchrefit.save(compiled, path)
    row["save_s"] = time.perf_counter() - t
    row["file_mb"] = os.path.getsize(path) / 1e6
    child = subprocess.run(
        [sys.executable, __file__, "--child", name, "--path", path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    row["fresh_process"] = (
        json.loads(child.stdout.strip().splitlines()[-1])
        if child.returncode == 0
        else f"rc={child.returncode}: {child.stderr[-800:]}"
    )
    os.remove(path)
    return row


def child(name: str, path: str) -> None:
    """In a fresh process: load, compare with eager B, refit with C, compare again."""
    t = time.perf_counter()
    loaded = torchrefit.load(path)
    result: dict = {"load_s": time.perf_counter() - t}
    b, c = build(name, 1), build(name, 2)
    with torch.no_grad():
        x = inputs(name)
        result["err_B_loaded"] = error(loaded(*x), b(*x))
        torchrefit.refit_module_weights(loaded, c, in_place=True)
        x = inputs(name)
        result["err_C_after_refit"] = error(loaded(*x), c(*x))
    print(json.dumps(result))


def aoti_probe() -> str:
    code = (
        "import torch;m=torch.nn.Linear(64,64).cuda();x=torch.randn(8,64,device='cuda');"
        "ep=torch.export.export(m,(x,));p=torch._inductor.aoti_compile_and_package(ep,package_path='/tmp/p.pt2');"
        "r=torch._inductor.aoti_load_package(p);print('aoti ok', (r(x)-m(x)).abs().max().item())"
    )
    try:
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    return (
        run.stdout.strip()[-200:]
        if run.returncode == 0
        else f"rc={run.returncode} {run.stderr[-300:]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--child")
    parser.add_argument("--path")
    parser.add_argument("--models", default="resnet50,bert-base")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.path)
    os.makedirs(args.out, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(env), flush=True)
    rows = [check_model(m, args.out) for m in args.models.split(",")]
    for row in rows:
        print(json.dumps(row), flush=True)
    env["aoti_probe"] = aoti_probe()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    print(json.dumps(env))


if __name__ == "__main__":
    main()
