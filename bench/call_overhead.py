"""What one call of a CUDA-graph compiled module costs beyond the graph's replay.

Side by side, one process, one card (ResNet-50 and BERT-base, float16, batch 8):
- recipe: Inductor's standalone_compile of the exported graph, weights as inputs, replayed
  as a CUDA graph (`graph.replay()` alone: the input already in its static buffer);
- recipe + copies: the same with the caller's input copied in and the output cloned out,
  what any caller of a captured graph must do;
- torchrefit: `compiled(x)` with cuda_graphs=True (binding, input guards, the read guard
  against refits, the copies, the output);
- torchrefit's graph runner alone (`CudaGraphs.run` on the flat inputs).
Times are medians of per-call CUDA event spans, each call synchronized, so host work that
the GPU waits for counts (as a caller sees it).
"""

from __future__ import annotations

import argparse
import json

import torch
from refit_bench import build, capture_standalone, event_ms, inputs

import torchrefit


def recipe(model: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    graph, static, outputs = capture_standalone(model, x)

    def with_copies() -> list[torch.Tensor]:
        for buffer, t in zip(static, x, strict=True):
            buffer.copy_(t)
        graph.replay()
        return [y.clone() for y in outputs]

    return event_ms(graph.replay, "cuda"), event_ms(with_copies, "cuda")


def measure(name: str, batch: int) -> dict[str, float]:
    model = build(name, 0, "cuda", torch.float16)
    x = inputs(name, "cuda", torch.float16, batch)
    compiled = torchrefit.compile(model, x, cuda_graphs=True)
    with torch.no_grad():
        compiled(*x)
    flat = list(x)
    runner = compiled._graphs(compiled._torchrefit.store)
    replay, copies = recipe(model, x)
    return {
        "recipe_replay_ms": replay,
        "recipe_with_copies_ms": copies,
        "torchrefit_call_ms": event_ms(lambda: compiled(*x), "cuda"),
        "torchrefit_graph_runner_ms": event_ms(lambda: runner.run(flat), "cuda"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="resnet50,bert-base")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.models.split(","):
        rows[name] = measure(name, args.batch)
        print(name, json.dumps(rows[name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
