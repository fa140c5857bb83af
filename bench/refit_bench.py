"""torchrefit against its peers, in one process on one device.

    PYTHONPATH=src python bench/refit_bench.py --device cuda --out DIR   # GPU: ResNet-50, BERT-base
    python bench/refit_bench.py --device cpu --quick                     # CPU smoke run (CI)

Measures compile time; inference latency (eager, torch.compile, torchrefit, torchrefit with
CUDA graphs); refit latency from GPU tensors, pinned host, pageable host, a safetensors
file and an ExportedProgram; the peers' update paths (eager load_state_dict; AOTInductor in
a subprocess, which crashed on load on most GPU machines here); peak extra memory of a
refit; and the copy bound from bandwidths measured in the same run. CUDA timings use CUDA
events or synchronized wall clocks, medians after warm-up; correctness is checked after
each refit. Prints a markdown table and writes it (and results.json) to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import torchrefit
from torchrefit.refit.verify import relative_error

# -- models -------------------------------------------------------------------------------


def build(name: str, seed: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        _perturb_batch_norms(model, seed)
    elif name == "bert-base":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig())
    elif name == "tiny-bert":
        from transformers import BertConfig, BertModel

        model = BertModel(
            BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                vocab_size=1000,
            )
        )
    elif name == "wide-mlp":  # >= 1.5 GB of float16 weights in a few large tensors
        width = 16384
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(3)])
    else:
        raise SystemExit(f"unknown model {name}")
    return model.eval().to(device, dtype)


def _perturb_batch_norms(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def inputs(name: str, device: str, dtype: torch.dtype, batch: int) -> tuple[torch.Tensor, ...]:
    if name == "resnet50":
        return (torch.randn(batch, 3, 224, 224, device=device, dtype=dtype),)
    if name == "wide-mlp":
        return (torch.randn(batch, 16384, device=device, dtype=dtype),)
    vocab = 1000 if name == "tiny-bert" else 30522
    return (torch.randint(0, vocab, (batch, 128), device=device),)


# -- timing -------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], device: str, warmup: int = 3, iters: int = 20) -> float:
    """Median of synchronized wall-clock times (host work included, as a caller sees it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def event_ms(fn: Callable[[], Any], device: str, warmup: int = 5, iters: int = 50) -> float:
    """Median device time by CUDA events (wall clock on CPU)."""
    if device != "cuda":
        return median_ms(fn, device, warmup, iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def error(actual: Any, expected: Any) -> float:
    leaves = torch.utils._pytree.tree_leaves
    a = [t for t in leaves(actual) if isinstance(t, torch.Tensor)]
    e = [t for t in leaves(expected) if isinstance(t, torch.Tensor)]
    return max(relative_error(x, y) for x, y in zip(a, e, strict=True))


# -- bandwidths: the copy bound -------------------------------------------------------------


def bandwidths(nbytes: int, device: str) -> dict[str, float]:
    """GB/s of one flat copy of `nbytes`: device to device (read + write), host to device."""
    if device != "cuda":
        a = torch.empty(nbytes, dtype=torch.uint8)
        b = torch.empty_like(a)
        ms = median_ms(lambda: b.copy_(a), device)
        return {"d2d_GBps": 2 * nbytes / ms / 1e6}
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)
    result = {
        "d2d_GBps": 2 * nbytes / event_ms(lambda: b.copy_(a), device) / 1e6,
        "h2d_pinned_GBps": nbytes
        / median_ms(lambda: b.copy_(pinned, non_blocking=True), device)
        / 1e6,
        "h2d_pageable_GBps": nbytes / median_ms(lambda: b.copy_(pageable), device) / 1e6,
    }
    return result


# -- one model ----------------------------------------------------------------------------


def bench_model(
    label: str, device: str, dtype: torch.dtype, batch: int, quick: bool, peers: bool = True
) -> dict[str, Any]:
    """`label` is a model name, optionally with @fold or @nofold (fold_batch_norm)."""
    row: dict[str, Any] = {"model": label}
    name, _, variant = label.partition("@")
    settings = {"fold_batch_norm": variant == "fold"} if variant else {}
    a, b = build(name, 0, device, dtype), build(name, 1, device, dtype)
    x = inputs(name, device, dtype, batch)
    row["weights_MB"] = sum(t.numel() * t.element_size() for t in a.state_dict().values()) / 1e6

    started = time.perf_counter()
    compiled = torchrefit.compile(a, x, **settings)
    row["compile_s"] = time.perf_counter() - started
    graphed = torchrefit.refit_module_weights(compiled, a)  # shares engines; own weights
    graphed = _with_cuda_graphs(graphed, device)

    with torch.no_grad():
        row["eager_ms"] = event_ms(lambda: a(*x), device)
        row["torchrefit_ms"] = event_ms(lambda: compiled(*x), device)
        if graphed is not None:
            row["torchrefit_cudagraph_ms"] = event_ms(lambda: graphed(*x), device)
            row["err_cudagraph"] = error(graphed(*x), a(*x))
        if not quick and peers:
            row["reference_standalone_cudagraph_ms"] = reference_standalone(a, x)
            started = time.perf_counter()
            tc = torch.compile(a)
            tc(*x)
            row["torch_compile_s"] = time.perf_counter() - started
            row["torch_compile_ms"] = event_ms(lambda: tc(*x), device)
            del tc
    row.update(bench_refits(name, compiled, graphed, a, b, x, device, quick))
    nbytes = compiled._torchrefit.store.nbytes()
    row.update(bandwidths(nbytes, device))
    row["copy_bound_ms"] = 2 * nbytes / row["d2d_GBps"] / 1e6
    return row


def reference_standalone(model: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> float:
    """The plain recipe on the same card: Inductor's standalone_compile of the exported graph
    with its weights as inputs, replayed as a CUDA graph (no torchrefit lowering)."""
    graph, _, _ = capture_standalone(model, x)
    return event_ms(graph.replay, "cuda")


def capture_standalone(
    model: torch.nn.Module, x: tuple[torch.Tensor, ...]
) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], list[torch.Tensor]]:
    """That recipe's captured graph, its static input buffers and its outputs."""
    from torch._inductor import standalone_compile

    ep = torch.export.export(model, x).run_decompositions()
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    weights = {**ep.state_dict, **ep.constants}
    static = [t.clone() for t in x]
    user = iter(static)
    args = [
        weights[s.target] if s.target is not None else next(user)
        for s in ep.graph_signature.input_specs
    ]
    assert len(args) == len(placeholders)
    with torch.no_grad():
        art = standalone_compile(ep.graph_module, [n.meta["val"] for n in placeholders])
        for _ in range(3):
            art(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = art(*args)
    return graph, static, list(outputs)


def _with_cuda_graphs(module: torchrefit.CompiledModule, device: str):
    if device != "cuda":
        return None
    import dataclasses

    state = module._torchrefit
    state.settings = dataclasses.replace(state.settings, cuda_graphs=True)
    return module


def bench_refits(name, compiled, graphed, a, b, x, device, quick) -> dict[str, Any]:
    row: dict[str, Any] = {}

    def fresh() -> tuple[torch.Tensor, ...]:
        dtype = x[0].dtype if x[0].is_floating_point() else torch.float16
        return inputs(name, device, dtype, x[0].shape[0])

    refit = torchrefit.refit_module_weights

    def check(label: str, module, model) -> None:
        with torch.no_grad():
            y = fresh()
            row[f"err_{label}"] = error(module(*y), model(*y))

    gpu_b = {k: v for k, v in b.state_dict().items()}
    row["refit_state_dict_device_ms"] = median_ms(
        lambda: refit(compiled, gpu_b, in_place=True), device
    )
    check("state_dict_device", compiled, b)
    row["A_vs_B_err"] = error(a(*x), b(*x))

    refitter = torchrefit.Refitter(compiled, b)
    refit(compiled, a, in_place=True)
    row["refitter_device_ms"] = median_ms(refitter, device, iters=50)
    row["refitter_copy"] = ",".join(type(c).__name__ for c in getattr(refitter, "copy_plan", []))
    if device == "cuda":  # the same, with batched copies instead of the gather-copy kernel
        os.environ["TORCHREFIT_GATHER_COPY"] = "0"
        plain = torchrefit.Refitter(compiled, b)
        del os.environ["TORCHREFIT_GATHER_COPY"]
        row["refitter_device_foreach_ms"] = median_ms(plain, device, iters=50)
        check("refitter_device_foreach", compiled, b)
    check("refitter_device", compiled, b)
    if graphed is not None:
        torchrefit.Refitter(graphed, b)()
        check("cudagraph_after_refit", graphed, b)

    if device == "cuda":
        pinned = {k: v.cpu().pin_memory() for k, v in a.state_dict().items()}
        row["refit_pinned_host_ms"] = median_ms(
            lambda: refit(compiled, pinned, in_place=True), device
        )
        check("pinned_host", compiled, a)
        pageable = {k: v.cpu() for k, v in b.state_dict().items()}
        row["refit_pageable_host_ms"] = median_ms(
            lambda: refit(compiled, pageable, in_place=True), device
        )
        check("pageable_host", compiled, b)
        pinned_refitter = torchrefit.Refitter(compiled, pinned)
        row["refitter_pinned_host_ms"] = median_ms(pinned_refitter, device)
        check("refitter_pinned_host", compiled, a)

    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        path = os.path.join(tmp, "b.safetensors")
        save_file({k: v.contiguous().cpu() for k, v in _untied(b).items()}, path)
        row["refit_safetensors_ms"] = median_ms(
            lambda: refit(compiled, path, in_place=True), device, warmup=1, iters=5
        )
        from safetensors.torch import load_file

        row["plain_safetensors_load_ms"] = median_ms(
            lambda: load_file(path, device=device), device, warmup=1, iters=5
        )
        check("safetensors", compiled, b)

    ep = torch.export.export(a, x)
    row["refit_exported_program_ms"] = median_ms(
        lambda: refit(compiled, ep, in_place=True), device, warmup=1, iters=5
    )
    check("exported_program", compiled, a)

    if device == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        refit(compiled, gpu_b, in_place=True)
        torch.cuda.synchronize()
        row["refit_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 1e6
        row["largest_weight_MB"] = (
            max(v.numel() * v.element_size() for v in compiled._torchrefit.store.tensors.values())
            / 1e6
        )

    eager_target = build(name, 2, device, a.state_dict()[next(iter(a.state_dict()))].dtype)
    row["eager_load_state_dict_ms"] = median_ms(lambda: eager_target.load_state_dict(gpu_b), device)
    return row


def _untied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def bench_large(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """A model with >= 1.5 GB of float16 weights, refitted from pinned host memory."""
    row: dict[str, Any] = {"model": "wide-mlp"}
    a = build("wide-mlp", 0, device, dtype)
    x = inputs("wide-mlp", device, dtype, 8)
    compiled = torchrefit.compile(a, x)
    nbytes = compiled._torchrefit.store.nbytes()
    row["weights_MB"] = nbytes / 1e6
    b_host = {
        k: v.cpu().pin_memory() for k, v in build("wide-mlp", 1, "cpu", dtype).state_dict().items()
    }
    row["refit_pinned_host_ms"] = median_ms(
        lambda: torchrefit.refit_module_weights(compiled, b_host, in_place=True),
        device,
        warmup=1,
        iters=5,
    )
    row["refit_pinned_GBps"] = nbytes / row["refit_pinned_host_ms"] / 1e6
    refitter = torchrefit.Refitter(compiled, b_host)
    row["refitter_pinned_host_ms"] = median_ms(refitter, device, warmup=1, iters=5)
    row["refitter_pinned_GBps"] = nbytes / row["refitter_pinned_host_ms"] / 1e6
    pageable = {k: v.clone() for k, v in b_host.items()}
    row["refit_pageable_host_ms"] = median_ms(
        lambda: torchrefit.refit_module_weights(compiled, pageable, in_place=True),
        device,
        warmup=1,
        iters=5,
    )
    row["refit_pageable_GBps"] = nbytes / row["refit_pageable_host_ms"] / 1e6
    row.update(bandwidths(nbytes, device))
    b = build("wide-mlp", 1, device, dtype)
    with torch.no_grad():
        row["err_pinned"] = error(compiled(*x), b(*x))
    return row


AOTI_PROBE = """
import torch, time, sys
sys.path.insert(0, 'bench')
from refit_bench import build, inputs
name = sys.argv[1]
a = build(name, 0, 'cuda', torch.float16); x = inputs(name, 'cuda', torch.float16, 8)
t = time.perf_counter()
ep = torch.export.export(a, x)
path = torch._inductor.aoti_compile_and_package(ep)
print('compile_s', time.perf_counter() - t, flush=True)
runner = torch._inductor.aoti_load_package(path)
print('loaded', flush=True)
"""


def aoti_probe(name: str) -> str:
    try:
        run = subprocess.run(
            [sys.executable, "-c", AOTI_PROBE, name], capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    lines = " ".join(
        line for line in run.stdout.splitlines() if line.startswith(("compile_s", "loaded"))
    )
    return f"rc={run.returncode} {lines}"


# -- report -------------------------------------------------------------------------------

ROWS = [
    ("weights_MB", "weights (MB)", "{:.0f}"),
    ("compile_s", "torchrefit compile (s)", "{:.1f}"),
    ("eager_ms", "inference: eager (ms)", "{:.3f}"),
    ("torch_compile_ms", "inference: torch.compile default (ms)", "{:.3f}"),
    ("torchrefit_ms", "inference: torchrefit (ms)", "{:.3f}"),
    ("torchrefit_cudagraph_ms", "inference: torchrefit, cuda_graphs=True (ms)", "{:.3f}"),
    (
        "reference_standalone_cudagraph_ms",
        "reference: standalone_compile, weights as inputs, CUDA graph (ms)",
        "{:.3f}",
    ),
    ("refitter_device_ms", "refit: Refitter from tensors on the device (ms)", "{:.3f}"),
    (
        "refitter_device_foreach_ms",
        "refit: Refitter from tensors on the device, _foreach_copy_ (ms)",
        "{:.3f}",
    ),
    (
        "refit_state_dict_device_ms",
        "refit: refit_module_weights, state_dict on the device (ms)",
        "{:.3f}",
    ),
    ("refit_exported_program_ms", "refit: refit_module_weights, ExportedProgram (ms)", "{:.2f}"),
    ("refitter_pinned_host_ms", "refit: Refitter from pinned host (ms)", "{:.3f}"),
    ("refit_pinned_host_ms", "refit: refit_module_weights, pinned host (ms)", "{:.3f}"),
    ("refit_pageable_host_ms", "refit: refit_module_weights, pageable host (ms)", "{:.3f}"),
    ("refit_pinned_GBps", "refit: refit_module_weights, pinned host (GB/s)", "{:.1f}"),
    ("refitter_pinned_GBps", "refit: Refitter from pinned host (GB/s)", "{:.1f}"),
    ("refit_pageable_GBps", "refit: refit_module_weights, pageable host (GB/s)", "{:.1f}"),
    ("refit_safetensors_ms", "refit: refit_module_weights, safetensors file (ms)", "{:.2f}"),
    (
        "plain_safetensors_load_ms",
        "plain: safetensors load_file(device=...) of the same file (ms)",
        "{:.2f}",
    ),
    ("eager_load_state_dict_ms", "peer: eager load_state_dict (ms)", "{:.3f}"),
    ("torch_compile_s", "peer: torch.compile first call = recompile (s)", "{:.1f}"),
    ("aoti", "peer: AOTInductor compile + load (subprocess)", "{}"),
    ("copy_bound_ms", "copy bound: weight bytes / measured D2D bandwidth (ms)", "{:.4f}"),
    ("d2d_GBps", "measured D2D (GB/s, read + write)", "{:.0f}"),
    ("h2d_pinned_GBps", "measured H2D pinned (GB/s)", "{:.1f}"),
    ("h2d_pageable_GBps", "measured H2D pageable (GB/s)", "{:.1f}"),
    ("refit_peak_extra_MB", "refit peak extra device memory (MB)", "{:.1f}"),
    ("largest_weight_MB", "largest single weight (MB)", "{:.1f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for key, label, fmt in ROWS:
        if not any(key in r for r in rows):
            continue
        cells = [fmt.format(r[key]) if key in r else "" for r in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = sorted({k for r in rows for k in r if k.startswith("err_")})
    for key in errors:
        lines.append(
            f"| check: rel. error vs eager, {key[4:]} | "
            + " | ".join(f"{r[key]:.1e}" if key in r else "" for r in rows)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--quick", action="store_true", help="skip torch.compile, AOTInductor, large"
    )
    parser.add_argument("--large", action="store_true", help="also the 1.5 GB wide MLP (GPU)")
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor probe")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    models = (args.models or ("resnet50,bert-base" if device == "cuda" else "tiny-bert")).split(",")
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    dtype_name = str(dtype).removeprefix("torch.")
    header = f"{card}, torch {torch.__version__}, {dtype_name}, batch {args.batch}, "
    header += time.strftime("%Y-%m-%d")
    print(header, flush=True)
    rows = []
    seen: set[str] = set()
    for name in models:
        base = name.partition("@")[0]
        row = bench_model(
            name, device, dtype, args.batch, args.quick, peers=base not in seen and device == "cuda"
        )
        seen.add(base)
        if device == "cuda" and not args.quick and not args.no_aoti:
            row["aoti"] = aoti_probe(name)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.large and device == "cuda":
        row = bench_large(device, dtype)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = f"{header}\n\n{table(rows)}\n"
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
            f.write(report)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
