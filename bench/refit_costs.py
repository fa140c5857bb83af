"""Every refit door and every guarantee it keeps, side by side with the bound it is measured
against, in one run on one device: the table of issue 17.

    PYTHONPATH=$PWD/src python3 bench/refit_costs.py --out $OUT     # GPU: ResNet-50, BERT-base,
                                                                   # and a 2.4 GB bf16 stack
    PYTHONPATH=$PWD/src python3 bench/refit_costs.py --device cpu   # CPU: an 84 MB MLP
    PYTHONPATH=$PWD/src python3 bench/refit_costs.py --quick        # a smoke run (CI)

Rows, each with its bound: a flat `copy_` of the weight bytes on the device (device
sources), one pinned host-to-device copy of them (pinned sources), safetensors'
`load_file(path, device=...)` (files), `_foreach_copy_` of the same tensors (CPU). Every
door is timed unchecked (`check_finite=False`), checked on a plain module (a read before
the gated copy) and checked double-buffered (checked as copied into the standby); the
`Refitter`'s host time per call beyond its graphs; inference throughput while a Refitter
refits on another thread as fast as it can; and a CUDA-graph call against the same-card
recipe. Times are medians of synchronized wall clocks (what a caller waits for). Every
refit is compared with eager PyTorch on fresh inputs afterwards (the err_ rows).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from refit_bench import build, error, event_ms, inputs, median_ms, sync  # noqa: E402

import torchrefit  # noqa: E402

Row = dict[str, Any]


def _variant(
    module: torchrefit.CompiledModule, model: torch.nn.Module, **settings: Any
) -> torchrefit.CompiledModule:
    """A copy with its own weights (sharing the engines) and other runtime settings."""
    copy = torchrefit.refit_module_weights(module, model)
    state = copy._torchrefit
    state.settings = dataclasses.replace(state.settings, **settings)
    return copy


def _flat_copy_ms(nbytes: int, device: str, iters: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), device, iters=iters)


def _h2d_ms(nbytes: int, iters: int) -> tuple[float, float]:
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    return (
        median_ms(lambda: dst.copy_(pinned, non_blocking=True), "cuda", iters=iters),
        median_ms(lambda: dst.copy_(pageable), "cuda", iters=iters),
    )


def refitter_rows(
    row: Row, label: str, modules: dict[str, Any], weights: Any, check: Callable, iters: int
) -> None:
    """A Refitter per configuration: unchecked, checked plain, checked double-buffered."""
    for mode, (module, options) in modules.items():
        refitter = torchrefit.Refitter(module, weights, **options)
        row[f"{label}_{mode}_ms"] = median_ms(refitter, row["device"], iters=iters)
        check(f"{label}_{mode}", module)
        if mode == "checked" and refitter._graphs is not None:
            row[f"{label}_host_us"] = host_overhead_us(refitter)


def host_overhead_us(refitter: torchrefit.Refitter, iters: int = 200) -> float:
    """A call's wall time minus the wall time of replaying its graphs and reading its flag:
    the host work the Refitter adds (binding check, guard, commit bookkeeping)."""
    graphs = refitter._graphs
    assert graphs is not None
    bank = next(iter(graphs.banks.values()))
    assert bank.graph is not None

    def replay_alone() -> None:
        if graphs.compute is not None:
            graphs.compute.replay()
        bank.graph.replay()
        if bank.transfer.flag is not None:
            bank.transfer.flag.item()

    def per_call(fn: Callable[[], Any]) -> float:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return 1e6 * statistics.median(times)

    if refitter.state.settings.double_buffer:
        return float("nan")  # two banks: the replay alone is not one graph
    return per_call(refitter) - per_call(replay_alone)


def model_rows(name: str, device: str, dtype: torch.dtype, quick: bool, seconds: float) -> Row:
    iters = 5 if quick else 50
    row: Row = {"model": name, "device": device}
    a, b = build(name, 0, device, dtype), build(name, 1, device, dtype)
    x = inputs(name, device, dtype, 2 if quick else 8)
    backend = "eager" if quick else "inductor"
    started = time.perf_counter()
    plain = torchrefit.compile(a, x, backend=backend)
    row["compile_s"] = time.perf_counter() - started
    double = _variant(plain, a, double_buffer=True)
    nbytes = plain._torchrefit.store.nbytes()
    row["weights_MB"] = nbytes / 1e6

    def check(label: str, module: Any, model: Any = b) -> None:
        y = inputs(name, device, dtype, x[0].shape[0])
        with torch.no_grad():
            row[f"err_{label}"] = error(module(*y), model(*y))

    if device == "cuda":
        row["flat_copy_ms"] = _flat_copy_ms(nbytes, device, iters)
    else:
        dsts, srcs = _pairs(plain, b)
        row["flat_copy_ms"] = median_ms(lambda: torch._foreach_copy_(dsts, srcs), device, 3, iters)
    configs = {
        "unchecked": (plain, {"check_finite": False}),
        "checked": (plain, {}),
        "double": (double, {}),
    }
    refitter_rows(row, "refitter_device", configs, b, check, iters)
    refit = torchrefit.refit_module_weights
    state_dict = dict(b.state_dict())
    for mode, (module, options) in configs.items():
        flag = options.get("check_finite")
        row[f"refit_device_{mode}_ms"] = median_ms(
            lambda m=module, f=flag: refit(m, state_dict, in_place=True, check_finite=f),
            device,
            iters=iters,
        )
        check(f"refit_device_{mode}", module)
    if device == "cuda":
        host_rows(row, a, configs, check, iters)
    file_rows(row, plain, double, b, device, check)
    ep = torch.export.export(a, x)
    row["refit_exported_program_ms"] = median_ms(
        lambda: refit(plain, ep, in_place=True), device, warmup=2, iters=max(5, iters // 5)
    )
    check("exported_program", plain, a)
    if device == "cuda" and not quick:
        serving_rows(row, a, b, x, seconds)
    return row


def _pairs(module: Any, model: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    store = module._torchrefit.store
    weights = dict(model.state_dict())
    keys = [k for k in store.tensors if k in weights]
    return [torch.empty_like(store[k]) for k in keys], [weights[k] for k in keys]


def host_rows(row: Row, a: Any, configs: dict[str, Any], check: Callable, iters: int) -> None:
    """Pinned and pageable host sources, against the measured host-to-device copy."""
    pinned_ms, pageable_ms = _h2d_ms(int(row["weights_MB"] * 1e6), iters)
    row["h2d_pinned_ms"], row["h2d_pageable_ms"] = pinned_ms, pageable_ms
    pinned = {k: v.cpu().pin_memory() for k, v in a.state_dict().items()}
    pageable = {k: v.cpu() for k, v in a.state_dict().items()}
    refitter_rows(row, "refitter_pinned", configs, pinned, lambda *_: None, iters)
    refit = torchrefit.refit_module_weights
    for mode, (module, options) in configs.items():
        flag = options.get("check_finite")
        for label, source in (("pinned", pinned), ("pageable", pageable)):
            row[f"refit_{label}_{mode}_ms"] = median_ms(
                lambda m=module, s=source, f=flag: refit(m, s, in_place=True, check_finite=f),
                "cuda",
                iters=max(5, iters // 5),
            )
        check(f"refit_pageable_{mode}", module, a)


def file_rows(row: Row, plain: Any, double: Any, b: Any, device: str, check: Callable) -> None:
    from safetensors.torch import load_file, save_file

    refit = torchrefit.refit_module_weights
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "b.safetensors")
        seen: set[int] = set()
        tensors = {}
        for k, v in b.state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                tensors[k] = v.contiguous().cpu()
        save_file(tensors, path)
        row["load_file_ms"] = median_ms(lambda: load_file(path, device=device), device, 1, 5)
        for mode, module in (("checked", plain), ("double", double)):
            row[f"refit_file_{mode}_ms"] = median_ms(
                lambda m=module: refit(m, path, in_place=True), device, 1, 5
            )
            check(f"refit_file_{mode}", module)


def serving_rows(row: Row, a: Any, b: Any, x: tuple, seconds: float) -> None:
    """Throughput of CUDA-graph inference while a Refitter refits on another thread, and a
    call's cost against the same-card recipe."""
    from call_overhead import recipe
    from concurrent_bench import throughput

    for mode in ("plain", "double"):
        module = torchrefit.compile(a, x, cuda_graphs=True, double_buffer=mode == "double")
        refitters = (torchrefit.Refitter(module, b), torchrefit.Refitter(module, a))
        alone = throughput(module, x, "cuda", seconds)
        during = throughput(module, x, "cuda", seconds, lambda i, r=refitters: r[i % 2]())
        row[f"serve_{mode}_ratio"] = during["calls_per_s"] / alone["calls_per_s"]
        row[f"serve_{mode}_refits_per_s"] = during["refits_per_s"]
        if mode == "plain":  # as call_overhead.py measures it: CUDA event spans
            row["recipe_call_ms"] = recipe(a, x)[1]
            with torch.no_grad():
                row["torchrefit_call_ms"] = event_ms(lambda m=module: m(*x), "cuda")


def stack_rows(device: str, quick: bool) -> Row:
    """A large model of few tensors (18 x Linear(8192, 8192), bf16, 2.4 GB: the 1B Llama
    shape's bytes): device refits against the flat copy."""
    width, layers = (64, 3) if quick else (8192, 18)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    row: Row = {"model": f"{layers}x{width}", "device": device}

    def stack(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        layers_ = [torch.nn.Linear(width, width) for _ in range(layers)]
        return torch.nn.Sequential(*layers_).eval().to(device, dtype)

    a, b = stack(0), stack(1)
    x = torch.randn(4, width, device=device, dtype=dtype)
    plain = torchrefit.compile(a, (x,), backend="eager")
    double = _variant(plain, a, double_buffer=True)
    del a
    nbytes = plain._torchrefit.store.nbytes()
    row["weights_MB"] = nbytes / 1e6
    iters = 5 if quick else 20
    row["flat_copy_ms"] = _flat_copy_ms(nbytes, device, iters)

    def check(label: str, module: Any) -> None:
        y = torch.randn(4, width, device=device, dtype=dtype)
        with torch.no_grad():
            row[f"err_{label}"] = error(module(y), b(y))

    configs = {
        "unchecked": (plain, {"check_finite": False}),
        "checked": (plain, {}),
        "double": (double, {}),
    }
    refitter_rows(row, "refitter_device", configs, b, check, iters)
    return row


def cpu_mlp_rows(quick: bool) -> Row:
    """An 84 MB float32 MLP on a CPU engine, refitted from a state_dict, against one
    `_foreach_copy_` of the same tensors."""
    width, layers = (64, 2) if quick else (2048, 5)
    torch.manual_seed(0)

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()

    a, b = make(), make()
    x = torch.randn(4, width)
    row: Row = {"model": "mlp", "device": "cpu"}
    plain = torchrefit.compile(a, (x,), backend="eager")
    double = _variant(plain, a, double_buffer=True)
    row["weights_MB"] = plain._torchrefit.store.nbytes() / 1e6
    iters = 5 if quick else 40
    state_dict = dict(b.state_dict())
    dsts, srcs = _pairs(plain, b)
    row["flat_copy_ms"] = median_ms(lambda: torch._foreach_copy_(dsts, srcs), "cpu", 3, iters)
    refit = torchrefit.refit_module_weights
    for mode, module, flag in (
        ("unchecked", plain, False),
        ("checked", plain, None),
        ("double", double, None),
    ):
        row[f"refit_device_{mode}_ms"] = median_ms(
            lambda m=module, f=flag: refit(m, state_dict, in_place=True, check_finite=f),
            "cpu",
            3,
            iters,
        )
        with torch.no_grad():
            row[f"err_refit_{mode}"] = error(module(x), b(x))
        refitter = torchrefit.Refitter(module, b, check_finite=flag)
        row[f"refitter_device_{mode}_ms"] = median_ms(refitter, "cpu", 3, iters)
    mutable_rows(row, copy.deepcopy(b), x, iters)  # no Refitter holds aliases of its weights
    return row


def mutable_rows(row: Row, model: torch.nn.Module, x: torch.Tensor, iters: int) -> None:
    """A MutableModule's call with unchanged weights (it must tell that nothing changed,
    `.data` writes included) against the compiled module's call."""
    with torch.no_grad():
        compiled = torchrefit.compile(model, (x,), backend="eager")
        row["call_compiled_ms"] = median_ms(lambda: compiled(x), "cpu", 3, iters)
        mutables = {}
        for label, check in (("call_mutable_unchecked_ms", False), ("call_mutable_ms", True)):
            mutables[label] = torchrefit.MutableModule(model, backend="eager", check_values=check)
            mutables[label](x)
            row[label] = median_ms(lambda m=mutables[label]: m(x), "cpu", 3, iters)
        model.get_submodule("0").weight.data.mul_(0.5)  # a .data write: the next call refits
        row["err_mutable"] = error(mutables["call_mutable_ms"](x), model(x))


LABELS = {
    "refitter_device": ("Refitter, device tensors", "flat_copy_ms"),
    "refit_device": ("refit_module_weights, state_dict on the device", "flat_copy_ms"),
    "refitter_pinned": ("Refitter, pinned host", "h2d_pinned_ms"),
    "refit_pinned": ("refit_module_weights, pinned host", "h2d_pinned_ms"),
    "refit_pageable": ("refit_module_weights, pageable host", "h2d_pageable_ms"),
    "refit_file": ("refit_module_weights, safetensors file", "load_file_ms"),
}


def table(rows: list[Row]) -> str:
    lines = ["| model | path | unchecked | checked plain | checked double-buffered | bound |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        for prefix, (label, bound) in LABELS.items():
            cells = []
            for mode in ("unchecked", "checked", "double"):
                ms = r.get(f"{prefix}_{mode}_ms")
                ratio = f" ({ms / r[bound]:.2f}x)" if ms is not None and bound in r else ""
                cells.append(f"{ms:.3f}{ratio}" if ms is not None else "")
            if any(cells):
                bound_text = f"{bound.removesuffix('_ms')} {r[bound]:.3f}" if bound in r else ""
                lines.append(
                    f"| {r['model']} | {label} | " + " | ".join(cells) + f" | {bound_text} |"
                )
        for key, label in (
            ("refitter_device_host_us", "Refitter host time per call beyond its graphs (us)"),
            ("refitter_pinned_host_us", "Refitter (pinned) host time per call (us)"),
            ("refit_exported_program_ms", "refit_module_weights, ExportedProgram fast path (ms)"),
            ("serve_plain_ratio", "inference throughput during refits, plain (x alone)"),
            ("serve_double_ratio", "inference throughput during refits, double-buffered"),
            ("torchrefit_call_ms", "CUDA-graph call, torchrefit (ms)"),
            ("call_compiled_ms", "call of the compiled module (ms)"),
            ("call_mutable_ms", "call of a MutableModule, weights unchanged (ms)"),
            ("call_mutable_unchecked_ms", "the same, check_values=False (ms)"),
            ("recipe_call_ms", "CUDA-graph call, same-card recipe with its copies (ms)"),
        ):
            if key in r:
                lines.append(f"| {r['model']} | {label} | {r[key]:.3f} | | | |")
    errors = sorted({k for r in rows for k in r if k.startswith("err_")})
    worst = max((r[k] for r in rows for k in errors if k in r), default=0.0)
    lines.append(
        f"\nEvery refit checked against eager on fresh inputs: worst relative error {worst:.1e}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-stack", action="store_true")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    header = f"{card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    print(header, flush=True)
    rows: list[Row] = []
    if device == "cuda":
        names = (args.models or ("tiny-bert" if args.quick else "resnet50,bert-base")).split(",")
        for name in names:
            rows.append(model_rows(name, device, torch.float16, args.quick, args.seconds))
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_stack:
            rows.append(stack_rows(device, args.quick))
            print(json.dumps(rows[-1]), flush=True)
    else:
        rows.append(cpu_mlp_rows(args.quick))
        print(json.dumps(rows[-1]), flush=True)
        name = args.models or "tiny-bert"
        rows.append(model_rows(name, "cpu", torch.float32, True, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    report = f"{header}\n\n{table(rows)}\n"
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "refit_costs.json"), "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "refit_costs.md"), "w") as f:
            f.write(report)
    sync(device)


if __name__ == "__main__":
    main()
