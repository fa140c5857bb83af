"""WeightSync against plain torch.distributed: rank 0 trains, every other rank serves.

    torchrun --nproc-per-node 2 bench/weight_sync_bench.py --out results.json    # GPUs, NCCL
    torchrun --nproc-per-node 2 bench/weight_sync_bench.py --smoke --out r.json  # CPU, Gloo

Per model, the time until every replica holds the trainer's weights (the slowest rank, a
median after warm-up), for: WeightSync (source packing into its send buffer, then again
after rehome(), where it packs nothing); one dist.broadcast of one flat buffer of the same
bytes (the transport's floor: no refit at all); and a broadcast per tensor followed by
load_state_dict into an eager model (what servers do today). Models: three 16384x16384
float16 linears (1.6 GB) and a Llama-3.2-1B-shaped bfloat16 model with random weights;
only the replicas are compiled. After the timed runs the trainer perturbs its weights,
syncs once more, and each replica's output is compared with eager on the trainer's weights
(received by the per-tensor path). Prints and writes a JSON of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import torchrefit
from torchrefit.distributed import WeightSync
from torchrefit.refit.verify import relative_error


def build(
    name: str, smoke: bool, device: torch.device
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model (random weights, seeded by rank) and example inputs."""
    torch.manual_seed(dist.get_rank())
    if name == "mlp":
        width, dtype = (64, torch.float32) if smoke else (16384, torch.float16)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(3)])
        return model.eval().to(device, dtype), (torch.randn(8, width, device=device, dtype=dtype),)
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        intermediate_size=128,
    )
    if not smoke:  # Llama-3.2-1B
        shape = dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            intermediate_size=8192,
        )
    config = LlamaConfig(**shape, use_cache=False, tie_word_embeddings=True)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = LlamaForCausalLM(config).eval().to(device, dtype)
    return model, (torch.randint(0, config.vocab_size, (1, 128), device=device),)


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median ms over `repeats` (after one warm-up) of the slowest rank."""
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i:
            times.append(1e3 * elapsed.item())
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rank = dist.get_rank()
    model, inputs = build(name, args.smoke, device)
    result: dict[str, Any] = {}
    compiled = None
    if rank != 0:
        started = time.perf_counter()
        compiled = torchrefit.compile(model, inputs, backend=args.backend)
        result["compile_s"] = time.perf_counter() - started
    sync = (
        WeightSync(weights=model, timeout=600)
        if rank == 0
        else WeightSync(compiled=compiled, timeout=600)
    )
    result["bytes"] = sync.layout.nbytes()
    result["weight_sync_ms"] = timed(sync, device, args.repeats)
    result["flat_broadcast_ms"] = timed(flat_broadcast(sync), device, args.repeats)
    per_tensor = per_tensor_load(model, rank)
    result["per_tensor_load_state_dict_ms"] = timed(per_tensor, device, args.repeats)
    if rank == 0:
        sync.rehome()
    result["weight_sync_rehomed_ms"] = timed(sync, device, args.repeats)
    result["rel_error"] = check(model, compiled, inputs, sync, per_tensor)
    for key in (
        "weight_sync_ms",
        "weight_sync_rehomed_ms",
        "flat_broadcast_ms",
        "per_tensor_load_state_dict_ms",
    ):
        result[key.replace("_ms", "_GBps")] = result["bytes"] / result[key] / 1e6
    return result


def flat_broadcast(sync: WeightSync) -> Callable[[], None]:
    """One broadcast of one flat buffer as large as all of WeightSync's buffers."""
    flat = torch.empty(sync.layout.nbytes(), dtype=torch.uint8, device=sync.device)
    return lambda: dist.broadcast(flat, src=0)


def per_tensor_load(model: torch.nn.Module, rank: int) -> Callable[[], None]:
    """A broadcast per tensor into preallocated buffers, then load_state_dict (eager)."""
    state = model.state_dict()
    received = {k: torch.empty_like(v) for k, v in state.items()}

    def run() -> None:
        current = model.state_dict() if rank == 0 else received  # fresh: rehome() moves tensors
        for key in sorted(state):
            dist.broadcast(current[key], src=0)
        if rank != 0:
            model.load_state_dict(received)

    return run


def check(
    model: torch.nn.Module,
    compiled: Any,
    inputs: tuple[torch.Tensor, ...],
    sync: WeightSync,
    per_tensor: Callable[[], None],
) -> float:
    """New trainer weights, one sync; the replicas' outputs against eager on those weights
    (the eager copy filled by the per-tensor path). The largest relative error of any rank."""
    if dist.get_rank() == 0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(torch.randn_like(p), alpha=0.01)
    sync()
    per_tensor()
    error = 0.0
    if compiled is not None:
        with torch.no_grad():
            got, want = compiled(*inputs), model(*inputs)
        got, want = (getattr(got, "logits", got), getattr(want, "logits", want))
        error = relative_error(got, want)
    worst = torch.tensor([error], dtype=torch.float64, device=inputs[0].device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny models, Gloo on CPU")
    parser.add_argument("--models", default="mlp,llama")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--backend",
        default=None,
        help="replica engine backend (default: inductor; eager with --smoke)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.backend = args.backend or ("eager" if args.smoke else "inductor")
    cuda = not args.smoke and torch.cuda.is_available()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cuda
        else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "backend": dist.get_backend(),
        "world": dist.get_world_size(),
        "torch": torch.__version__,
        "models": {},
    }
    for name in args.models.split(","):
        report["models"][name] = bench_model(name, args, device)
        if cuda:
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        text = json.dumps(report, indent=2)
        print(text, flush=True)
        if args.out:
            tmp = f"{args.out}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
