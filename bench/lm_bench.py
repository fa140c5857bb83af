"""LLM generation: torchrefit's CompiledLM against transformers, side by side in one process.

Model: a Llama-3.2-1B-shaped config (hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab
128256, tied embeddings) with random weights in bfloat16; `--tiny` runs the same rows on a
tiny config (CPU smoke test). Rows:

- bounds: the weights' bytes, one read of them (a reduction over a flat buffer of that size:
  decode's per-token floor at batch 1) and one flat copy;
- decode time per token at batch 1 and per step at batch 32 (32-token prompts, 128 new
  tokens; the time of a whole `generate` over the new tokens): transformers eager
  `generate`, transformers with its static cache (`cache_implementation="static"`, which it
  compiles), torchrefit `compile_lm` with CUDA graphs;
- prefill of 512-token prompts; compile time of `compile_lm` and the engine-cache hit;
- refits of the whole model with `Refitter` from device tensors, `load_state_dict` and a
  flat copy; an RL-shaped loop (batch 32, 256 new tokens, a refit, three times);
- tokens checked: torchrefit's greedy tokens against transformers' (bfloat16 rounding may
  part them after a while: the matching prefix is reported), before and after a refit;
- `eos`: tokens per second at batch 32 with rows ending apart (lengths drawn uniformly in
  16-256; the model forces each row's EOS at its drawn length, so both systems do the same
  work whatever they draw), greedy and sampled, torchrefit against transformers' static
  cache (compiled on a GPU; transformers compiles it on GPUs only) in the same run.

Writes a JSON file (--out) after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

import torchrefit


def config(tiny: bool) -> transformers.LlamaConfig:
    if tiny:
        return transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    return transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=128001,
    )  # fmt: skip


def build(cfg: transformers.LlamaConfig, device: str, dtype: torch.dtype, seed: int) -> Any:
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


class EndsAt(transformers.LlamaForCausalLM):
    """The `eos` section's model: a Llama whose logits make row r's EOS the only choice at
    position `ends[r]` and refuse it before, so rows end at drawn lengths whatever the
    tokens (bfloat16 rounding may part the two systems' tokens, never their work)."""

    def __init__(self, cfg: transformers.LlamaConfig, ends: torch.Tensor) -> None:
        super().__init__(cfg)
        self.register_buffer("ends", ends.clone())

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache_position: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, cache_position=cache_position,
            logits_to_keep=logits_to_keep, **kwargs,
        )  # fmt: skip
        logits = out.logits
        if position_ids is None:
            assert cache_position is not None
            position_ids = cache_position[None].expand(logits.shape[0], -1)
        if isinstance(logits_to_keep, int):
            kept = position_ids[:, -logits_to_keep:] if logits_to_keep else position_ids
        else:
            kept = position_ids[:, logits_to_keep]
        at_end = kept == self.ends[: logits.shape[0], None]
        eos = self.config.eos_token_id
        logits[:, :, eos] = torch.where(at_end, 1e4, -1e4).to(logits.dtype)
        return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_s(fn: Callable[[], Any], device: str, repeat: int = 3) -> float:
    """Median wall time of whole calls (each ends with a sync)."""
    times = []
    for _ in range(repeat):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def device_ms(fn: Callable[[], Any], device: str, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if device != "cuda":
        return 1e3 * wall_s(lambda: [fn() for _ in range(iters)], device, 1) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def prompts(batch: int, length: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def agreeing_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    differs = (a != b).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else a.shape[1]


class Run:
    def __init__(self, out: str | None) -> None:
        self.out = out
        self.results: dict[str, Any] = {}

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        try:
            self.results[name] = fn()
        except Exception as exc:  # a section that fails leaves the others standing
            self.results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        self.results[name]["section_s"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(self.results[name]), flush=True)
        if self.out:
            with open(self.out + ".tmp", "w") as f:
                json.dump(self.results, f, indent=1)
            os.replace(self.out + ".tmp", self.out)


class LMBench:
    """The rows, one method a section; the models and compiled LMs shared between them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.skip = set(filter(None, args.skip.split(",")))
        self.cfg = config(args.tiny)
        self.backend = args.backend
        self.prompt, self.new = args.prompt, args.new
        self.decode_sizes = (
            None
            if args.decode_sizes is None
            else [int(b) for b in args.decode_sizes.split(",") if b]
        )
        self.model = build(self.cfg, self.device, self.dtype, seed=0)
        self.trainer = build(self.cfg, self.device, self.dtype, seed=1)
        self.cache_dir = tempfile.mkdtemp(prefix="torchrefit-lm-cache-")
        self.lms: dict[str, Any] = {}

    def machine(self) -> dict[str, Any]:
        cuda = self.device == "cuda"
        return {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": str(self.dtype),
        }

    def ids(self, batch: int, length: int) -> torch.Tensor:
        return prompts(batch, length, self.cfg.vocab_size, self.device)

    def long_lm(self) -> Any:
        """The CompiledLM for 512-token prompts and 256-token rollouts."""
        if "long" not in self.lms:
            self.lms["long"] = torchrefit.compile_lm(self.model, max_batch_size=32, max_seq_len=544)
        return self.lms["long"]

    def greedy(self, model: Any, ids: torch.Tensor, new: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def eos_spread(self, batch: int = 32, longest: int = 256) -> dict[str, Any]:
        """Tokens per second at batch 32, row lengths uniform in 16-256 (each row's EOS
        forced at its length): greedy and sampled (top_p 0.95), torchrefit against
        transformers' static cache, in this run. Tokens counted: each row's own, EOS
        included, not the padding after it."""
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(min(16, longest), longest + 1, (batch,), generator=g)
        # the token ending a row of length L comes from the logits at position prompt-2+L
        ends = (self.prompt - 2 + lengths).to(self.device)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = EndsAt(self.cfg, ends)
        model = model.to(self.dtype).eval()
        model.generation_config.pad_token_id = 0
        started = time.perf_counter()
        sizes = [b for b in self.decode_sizes or () if b == batch]  # this batch's, if asked
        lm = torchrefit.compile_lm(
            model, batch, self.prompt + longest, backend=self.backend, decode_batch_sizes=sizes
        )
        row: dict[str, Any] = {
            "lengths": {
                "min": int(lengths.min()),
                "mean": float(lengths.float().mean()),
                "max": int(lengths.max()),
            },  # fmt: skip
            "tokens": int(lengths.sum()),
            "compile_lm_s": time.perf_counter() - started,
            "transformers_static_compiled": self.device == "cuda",
        }
        ids = self.ids(batch, self.prompt)
        eos = self.cfg.eos_token_id
        sampled = {"do_sample": True, "top_p": 0.95, "top_k": 0}  # top_k 0: transformers' off
        for mode, options in (("greedy", {"do_sample": False}), ("sampled", sampled)):

            def ours(options: dict[str, Any] = options) -> Any:
                return lm.generate(ids, max_new_tokens=longest, **options)

            def static(options: dict[str, Any] = options) -> Any:
                with torch.no_grad():
                    return model.generate(
                        ids, max_new_tokens=longest, cache_implementation="static", **options
                    )  # fmt: skip

            for name, fn in (("torchrefit", ours), ("transformers_static", static)):
                ends_at = (fn()[:, self.prompt :] == eos).int().argmax(dim=1).cpu() + 1
                row[f"{name}_{mode}_rows_end_as_drawn"] = bool(torch.equal(ends_at, lengths))
                seconds = wall_s(fn, self.device, 2)
                row[f"{name}_{mode}_s"] = seconds
                row[f"{name}_{mode}_tokens_per_s"] = row["tokens"] / seconds
            row[f"speedup_{mode}"] = (
                row[f"torchrefit_{mode}_tokens_per_s"]
                / row[f"transformers_static_{mode}_tokens_per_s"]
            )
        return row

    def bounds(self) -> dict[str, Any]:
        nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        flat = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device)
        flat.normal_()
        other = torch.empty_like(flat)
        return {
            "weight_bytes": nbytes,
            "read_ms": device_ms(lambda: flat.sum(), self.device),
            "flat_copy_ms": device_ms(lambda: other.copy_(flat), self.device),
        }

    def compile_times(self) -> dict[str, Any]:
        def compile_lm() -> Any:
            return torchrefit.compile_lm(
                self.model, 32, self.prompt + self.new, cache_dir=self.cache_dir,
                decode_batch_sizes=self.decode_sizes,
            )  # fmt: skip

        started = time.perf_counter()
        self.lms["decode"] = compile_lm()
        cold = time.perf_counter() - started
        started = time.perf_counter()
        compile_lm()
        (engine,) = self.lms["decode"].engines().values()
        return {
            "compile_lm_s": cold,
            "compile_lm_cache_hit_s": time.perf_counter() - started,
            "decode_batch_sizes": self.decode_sizes,
            "decode_variants": len(engine.variants),
        }

    def decode(self, batch: int) -> dict[str, Any]:
        ids, new, lm = self.ids(batch, self.prompt), self.new, self.lms["decode"]
        lm.generate(ids, max_new_tokens=new)  # captures this batch size's CUDA graph
        row: dict[str, Any] = {
            "torchrefit_ms_per_token": 1e3
            * wall_s(lambda: lm.generate(ids, max_new_tokens=new), self.device)
            / new
        }
        reference = self.greedy(self.model, ids, new)
        row["transformers_eager_ms_per_token"] = (
            1e3 * wall_s(lambda: self.greedy(self.model, ids, new), self.device, 2) / new
        )
        got = lm.generate(ids, max_new_tokens=new)
        row["greedy_prefix_agreeing_with_eager"] = agreeing_prefix(
            got[:, self.prompt :], reference[:, self.prompt :]
        )
        variants = self.lms["decode"].engines()["_engine_0"].variants
        if any(key[1][1][0] == batch for key in variants):  # this batch has its own engine
            row["torchrefit_general_engine_ms_per_token"] = self.general(ids)
        if "static" not in self.skip and self.device == "cuda":
            row.update(self.static(ids))
        row["tokens_per_s_torchrefit"] = batch * 1e3 / row["torchrefit_ms_per_token"]
        return row

    def general(self, ids: torch.Tensor) -> float:
        """ms per token of the same CompiledLM decoding with its general (dynamic) engine:
        the variants compiled for exact decode shapes set aside, CUDA graphs captured anew."""
        lm = self.lms["decode"]
        engine = lm.engines()["_engine_0"]
        variants, engine.variants = engine.variants, {}
        lm.__dict__.pop("_cuda_graphs", None)
        try:
            lm.generate(ids, max_new_tokens=self.new)
            return (
                1e3
                * wall_s(lambda: lm.generate(ids, max_new_tokens=self.new), self.device)
                / self.new
            )
        finally:
            engine.variants = variants
            lm.__dict__.pop("_cuda_graphs", None)

    def static(self, ids: torch.Tensor) -> dict[str, Any]:
        """transformers' recipe: its static cache, which generate compiles."""

        def static() -> Any:
            with torch.no_grad():
                return self.model.generate(
                    ids, max_new_tokens=self.new, min_new_tokens=self.new, do_sample=False,
                    cache_implementation="static",
                )  # fmt: skip

        started = time.perf_counter()
        static()
        first = time.perf_counter() - started
        static()
        return {
            "transformers_static_first_call_s": first,
            "transformers_static_ms_per_token": 1e3 * wall_s(static, self.device, 2) / self.new,
        }

    def accuracy(self) -> dict[str, Any]:
        """Prefill logits of torchrefit and of transformers eager, both bfloat16, against the
        same model in float32 (relative error of all logits; greedy tokens of random weights
        part at near-ties, so tokens alone say little in bfloat16)."""
        ids = self.ids(4, self.prompt)
        reference = copy.deepcopy(self.model).float()
        with torch.no_grad():
            exact = reference(ids).logits.float()
            eager = self.model(ids).logits.float()
        ours = self.lms["decode"](ids).float()
        del reference

        def rel(x: torch.Tensor) -> float:
            return float((x - exact).norm() / exact.norm())

        return {
            "torchrefit_bf16_logits_rel_error_vs_fp32": rel(ours),
            "transformers_bf16_logits_rel_error_vs_fp32": rel(eager),
            "torchrefit_vs_transformers_top1_agreement": float(
                (ours.argmax(-1) == eager.argmax(-1)).float().mean()
            ),
        }

    def prefill(self) -> dict[str, Any]:
        lm, row = self.long_lm(), {}
        for batch in (1, 8):
            ids = self.ids(batch, 512)

            def ours(ids: torch.Tensor = ids) -> Any:
                return lm.generate(ids, max_new_tokens=1)

            def eager(ids: torch.Tensor = ids) -> Any:
                with torch.no_grad():
                    return self.model(ids, logits_to_keep=1)

            ours(), eager()
            row[f"torchrefit_prefill_512_b{batch}_ms"] = 1e3 * wall_s(ours, self.device)
            row[f"transformers_eager_forward_512_b{batch}_ms"] = 1e3 * wall_s(eager, self.device)
        return row

    def refits(self) -> dict[str, Any]:
        lm = self.lms["decode"]
        refit = torchrefit.Refitter(lm, self.trainer)
        refit()
        row: dict[str, Any] = {"refitter_device_ms": device_ms(refit, self.device, iters=10)}
        unchecked = torchrefit.Refitter(lm, self.trainer, check_finite=False)
        row["refitter_device_unchecked_ms"] = device_ms(unchecked, self.device, iters=10)
        twin = build(self.cfg, self.device, self.dtype, seed=2)
        state = self.trainer.state_dict()
        row["load_state_dict_ms"] = 1e3 * wall_s(lambda: twin.load_state_dict(state), self.device)
        ids, new = self.ids(1, self.prompt), min(32, self.new)
        got = lm.generate(ids, max_new_tokens=new)
        want = self.greedy(self.trainer, ids, new)
        row["after_refit_greedy_prefix_agreeing"] = agreeing_prefix(
            got[:, self.prompt :], want[:, self.prompt :]
        )
        return row

    def rl_loop(self) -> dict[str, Any]:
        lm = self.long_lm()
        refit = torchrefit.Refitter(lm, self.trainer)
        ids = self.ids(32, self.prompt)
        lm.generate(ids, max_new_tokens=256)
        first = wall_s(refit, self.device, 1)  # the first call captures the refit's CUDA graphs
        generate_s, refit_s = [], []
        for _ in range(3):
            with torch.no_grad():
                for p in self.trainer.parameters():  # the trainer's step (not timed)
                    p.add_(torch.randn_like(p), alpha=1e-3)
            refit_s.append(wall_s(refit, self.device, 1))
            generate_s.append(wall_s(lambda: lm.generate(ids, max_new_tokens=256), self.device, 1))
        total = sum(generate_s) + sum(refit_s)
        return {
            "first_refit_ms": 1e3 * first,
            "generate_s": generate_s,
            "refit_ms": [1e3 * r for r in refit_s],
            "refit_share_of_loop": sum(refit_s) / total,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--skip", default="", help="sections to skip: decode,static,prefill,rl,eos")
    parser.add_argument("--backend", default="inductor", help="compile_lm's backend (eos)")
    parser.add_argument("--eos-batch", type=int, default=32, help="eos: rows")
    parser.add_argument("--eos-longest", type=int, default=256, help="eos: longest row")
    parser.add_argument(
        "--decode-sizes", default=None, help="compile_lm's decode_batch_sizes, e.g. 1,32"
    )
    args = parser.parse_args()
    bench, run = LMBench(args), Run(args.out)
    run.results["machine"] = bench.machine()
    run.section("bounds", bench.bounds)
    if "decode" not in bench.skip:  # the sections of the decode CompiledLM
        run.section("compile", bench.compile_times)
        run.section("decode_b1", lambda: bench.decode(1))
        run.section("decode_b32", lambda: bench.decode(32))
        run.section("accuracy", bench.accuracy)
        run.section("refit", bench.refits)
    if "prefill" not in bench.skip:
        run.section("prefill", bench.prefill)
    if "rl" not in bench.skip:
        run.section("rl_loop", bench.rl_loop)
    if "eos" not in bench.skip:
        run.section("eos_spread", lambda: bench.eos_spread(args.eos_batch, args.eos_longest))


if __name__ == "__main__":
    main()
