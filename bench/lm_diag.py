"""Diagnostics for CompiledLM decode on CUDA: are the decode graphs captured, and where
does a step's host time go (a profile of the decode loop)."""

from __future__ import annotations

import cProfile
import logging
import pstats
import sys
import time

import torch
import transformers

import torchrefit

logging.basicConfig(level=logging.WARNING)
tiny = "--tiny" in sys.argv
cfg = transformers.LlamaConfig(
    hidden_size=64 if tiny else 2048, intermediate_size=128 if tiny else 8192,
    num_hidden_layers=2 if tiny else 16, num_attention_heads=4 if tiny else 32,
    num_key_value_heads=2 if tiny else 8, vocab_size=512 if tiny else 128256,
    tie_word_embeddings=True,
)  # fmt: skip
torch.manual_seed(0)
with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
model.generation_config.eos_token_id = None
lm = torchrefit.compile_lm(model, max_batch_size=4, max_seq_len=160)
ids = torch.randint(3, cfg.vocab_size, (1, 32), device="cuda")
lm.generate(ids, max_new_tokens=8)
for graphs in lm.__dict__.get("_cuda_graphs", {}).values():
    print(
        "graphs",
        [
            (k[0][0] if isinstance(k[0], tuple) else k[0], v is not None)
            for k, v in graphs.captured.items()
        ],
    )
torch.cuda.synchronize()
started = time.perf_counter()
lm.generate(ids, max_new_tokens=64)
torch.cuda.synchronize()
print("ms per token", 1e3 * (time.perf_counter() - started) / 64)
cProfile.run("lm.generate(ids, max_new_tokens=64); torch.cuda.synchronize()", "/tmp/lm.prof")
pstats.Stats("/tmp/lm.prof").sort_stats("cumtime").print_stats(25)
activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=activities) as prof:
    lm.generate(ids, max_new_tokens=64)
    torch.cuda.synchronize()
events = prof.key_averages()
busy = sum(e.self_device_time_total for e in events) / 1e3
print(f"GPU busy per token {busy / 64:.3f} ms")
print(events.table(sort_by="self_device_time_total", row_limit=15))
with torch.no_grad():
    want = model(ids).logits.float()
got = lm(ids).float()
print("prefill logits relative error", float((got - want).norm() / want.norm()))
