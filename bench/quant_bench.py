"""Quantized engines: bf16, fp8 and int8 CompiledLMs of one model, side by side in one run.

Model: the Llama-3.2-1B shape (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV
heads, vocab 128256, tied embeddings) with random weights in bfloat16; `--tiny` runs the
same rows on a tiny config (CPU smoke test, float32). Rows:

- bounds: the bf16 weights' bytes, one read of them, one flat copy of them;
- compile time of each `compile_lm` (decode variants: batch 1 on a GPU);
- decode ms per token at batch 1 and per step at batch 32 (32-token prompts, `--new`
  tokens; whole `generate` calls), tokens/s, and fp8 / int8 against bf16;
- refit: a `Refitter` from bf16 device tensors into each engine (the quantized ones
  re-quantize every linear weight), against a flat copy of the bf16 bytes; the quantized
  constants checked bit-identical to the definition;
- memory: the engines' weight bytes and saved file sizes;
- accuracy: prefill logits over a few hundred positions of each quantized engine against
  bf16 eager (relative error, top-1 agreement, KL), and against eager with the same
  fake-quantized weights (which must be within bf16 rounding).

Writes JSON (--out) after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Any

import torch
import transformers

import torchrefit
from torchrefit.quantize import dequantize, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_bench import Run, build, config, device_ms, wall_s  # noqa: E402  (the same model and timers)

FMTS = ("fp8", "int8")


def fake_quantized(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """A copy whose linear weights are the definition's dequantized values (a tied head its
    own; the embedding lookup keeps full precision), as the engine computes."""
    fake = copy.deepcopy(model)
    embedding = fake.get_input_embeddings().weight
    with torch.no_grad():
        for module in fake.modules():
            if isinstance(module, torch.nn.Linear):
                q, s = reference(module.weight, fmt)
                value = dequantize(q, s, module.weight.dtype)
                if module.weight is embedding:
                    module.weight = torch.nn.Parameter(value)
                else:
                    module.weight.copy_(value)
    return fake


class QuantBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.cfg = config(args.tiny)
        self.prompt, self.new = args.prompt, args.new
        self.batches = [int(b) for b in args.batches.split(",")]
        self.backend = args.backend
        self.model = build(self.cfg, self.device, self.dtype, seed=0)
        self.trainer = build(self.cfg, self.device, self.dtype, seed=1)
        self.lms: dict[str, Any] = {}

    def ids(self, batch: int, length: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + batch)
        return torch.randint(3, self.cfg.vocab_size, (batch, length), generator=g).to(self.device)

    def machine(self) -> dict[str, Any]:
        cuda = self.device == "cuda"
        return {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": str(self.dtype),
        }

    def bounds(self) -> dict[str, Any]:
        nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        flat = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device).normal_()
        other = torch.empty_like(flat)
        return {
            "bf16_weight_bytes": nbytes,
            "read_ms": device_ms(lambda: flat.sum(), self.device),
            "flat_copy_ms": device_ms(lambda: other.copy_(flat), self.device),
        }

    def compile_all(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for fmt in (None, *FMTS):
            started = time.perf_counter()
            self.lms[fmt or "bf16"] = torchrefit.compile_lm(
                self.model, max(self.batches), self.prompt + self.new, quantize=fmt,
                backend=self.backend,
            )  # fmt: skip
            row[f"compile_lm_{fmt or 'bf16'}_s"] = time.perf_counter() - started
        return row

    def decode(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for batch in self.batches:
            ids = self.ids(batch, self.prompt)
            for name, lm in self.lms.items():
                lm.generate(ids, max_new_tokens=self.new)  # graphs captured
                ms = 1e3 * wall_s(
                    lambda lm=lm, ids=ids: lm.generate(ids, max_new_tokens=self.new), self.device
                )
                row[f"{name}_b{batch}_ms_per_token"] = ms / self.new
                row[f"{name}_b{batch}_tokens_per_s"] = batch * 1e3 * self.new / ms
            for fmt in FMTS:
                row[f"{fmt}_b{batch}_speedup_vs_bf16"] = (
                    row[f"bf16_b{batch}_ms_per_token"] / row[f"{fmt}_b{batch}_ms_per_token"]
                )
        return row

    def refits(self) -> dict[str, Any]:
        nbytes = sum(p.numel() * p.element_size() for p in self.trainer.parameters())
        flat = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device).normal_()
        other = torch.empty_like(flat)
        row: dict[str, Any] = {
            "flat_copy_bf16_bytes_ms": device_ms(lambda: other.copy_(flat), self.device)
        }
        for name, lm in self.lms.items():
            refit = torchrefit.Refitter(lm, self.trainer)
            refit()
            row[f"refitter_into_{name}_ms"] = device_ms(refit, self.device, iters=10)
            unchecked = torchrefit.Refitter(lm, self.trainer, check_finite=False)
            row[f"refitter_into_{name}_unchecked_ms"] = device_ms(unchecked, self.device, iters=10)
            row[f"refitter_into_{name}_vs_flat_copy"] = (
                row[f"refitter_into_{name}_ms"] / row["flat_copy_bf16_bytes_ms"]
            )
            if name in FMTS:
                row[f"{name}_bit_identical_to_definition"] = self.identical(lm, name)
            torchrefit.refit_module_weights(lm, self.model, in_place=True)
        return row

    def identical(self, lm: Any, fmt: str) -> bool:
        params = dict(self.trainer.named_parameters(remove_duplicate=False))
        store = lm._torchrefit.store
        for key, lineage in lm.weight_map().items():
            if key.startswith(f"~{fmt}:"):
                q, s = reference(params[lineage.sources[0]].detach(), fmt)
                scale = store[key.replace(f"~{fmt}:", f"~{fmt}_scale:")]
                if not (
                    torch.equal(store[key].view(torch.uint8), q.view(torch.uint8))
                    and torch.equal(scale, s)
                ):
                    return False
        return True

    def memory(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, lm in self.lms.items():
                store = lm._torchrefit.store
                cache = set(lm._torchrefit.lm.cache_keys)
                row[f"{name}_weight_bytes"] = sum(
                    t.numel() * t.element_size() for k, t in store.tensors.items() if k not in cache
                )
                path = os.path.join(tmp, f"{name}.trf")
                torchrefit.save(lm, path)
                row[f"{name}_file_bytes"] = os.path.getsize(path)
                os.remove(path)
        for fmt in FMTS:
            row[f"{fmt}_weight_bytes_vs_bf16"] = (
                row[f"{fmt}_weight_bytes"] / row["bf16_weight_bytes"]
            )
            row[f"{fmt}_file_bytes_vs_bf16"] = row[f"{fmt}_file_bytes"] / row["bf16_file_bytes"]
        return row

    def accuracy(self) -> dict[str, Any]:
        """Prefill logits over 4 x 64 positions (fewer with small limits)."""
        ids = self.ids(min(4, max(self.batches)), min(64, self.prompt + self.new), seed=9)
        with torch.no_grad():
            eager = self.model(ids).logits.float()
        row: dict[str, Any] = {}
        for name, lm in self.lms.items():
            ours = lm(ids).float()
            row[f"{name}_vs_bf16_eager_rel_error"] = float((ours - eager).norm() / eager.norm())
            row[f"{name}_vs_bf16_eager_top1_agreement"] = float(
                (ours.argmax(-1) == eager.argmax(-1)).float().mean()
            )
            row[f"{name}_vs_bf16_eager_kl"] = float(
                torch.nn.functional.kl_div(
                    ours.log_softmax(-1).flatten(0, 1), eager.log_softmax(-1).flatten(0, 1),
                    log_target=True, reduction="batchmean",
                )
            )  # fmt: skip
            if name in FMTS:
                fake = fake_quantized(self.model, name)
                with torch.no_grad():
                    same = fake(ids).logits.float()
                del fake
                row[f"{name}_vs_fake_quantized_eager_rel_error"] = float(
                    (ours - same).norm() / same.norm()
                )
        return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke test)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--skip", default="", help="sections to skip, comma-separated")
    parser.add_argument("--out", default=None, help="JSON file written after every section")
    args = parser.parse_args(argv)
    bench = QuantBench(args)
    run = Run(args.out)
    skip = set(filter(None, args.skip.split(",")))
    sections = [
        ("machine", bench.machine),
        ("bounds", bench.bounds),
        ("compile", bench.compile_all),
        ("decode", bench.decode),
        ("refits", bench.refits),
        ("memory", bench.memory),
        ("accuracy", bench.accuracy),
    ]
    for name, fn in sections:
        if name not in skip:
            run.section(name, fn)
    failed = [k for k, v in run.results.items() if "error" in v]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
