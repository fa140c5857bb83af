"""An RL-style loop that trains a LoRA and generates with a merged, full-speed engine of the
base model: `Refitter(compiled_base, peft_model)` computes `W + scale * B @ A` for the
adapted layers on the engine's device each step and refits only those.

.venv/bin/python examples/lora_trainer.py [--backend inductor] [--measure]

Backend: eager by default. The engines then run the compiled graphs op by op (no code
generation), so the loop runs in a few seconds on a CPU; the refit itself (merge, check,
copy) is the same for both backends. `--backend inductor` compiles Inductor engines
(torchrefit's default, what you deploy: about 20 s for the whole run on a 2-core CPU).
`--measure` times the Refitter call against a full refit of every weight and a flat copy of
the adapted bytes (`--device cuda --dtype bfloat16 --hidden 2048 --layers 16` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchrefit
from torchrefit.refit.verify import relative_error


def small_llama(hidden: int = 256, layers: int = 4) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        use_cache=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def with_lora(base: LlamaForCausalLM) -> peft.PeftModel:
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


def train_step(model: peft.PeftModel, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One policy-gradient-shaped step: a loss on sampled tokens, only the LoRA trains."""
    model.train()
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()


def main(
    backend: str = "eager", quiet: bool = False, steps: int = 4, hidden: int = 256
) -> list[float]:
    """The loop; returns each step's relative error of the engine against eager peft."""
    base = small_llama(hidden)
    ids = torch.randint(0, 2048, (2, 32))
    compiled = torchrefit.compile(base, (ids,), backend=backend)
    model = with_lora(base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    refitter = torchrefit.Refitter(compiled, model)  # binds the peft model's tensors once
    if not quiet:
        print(f"backend {backend}: {len(refitter.tensors)} adapted weights refitted per step")
    errors = []
    for step in range(steps):
        train_step(model, ids, optimizer)
        started = time.perf_counter()
        refitter()  # merge the adapted layers, check them, copy them into the engines
        ms = 1e3 * (time.perf_counter() - started)
        prompt = torch.randint(0, 2048, (2, 32))
        with torch.no_grad():
            errors.append(relative_error(compiled(prompt).logits, model(prompt).logits))
        if not quiet:
            print(f"step {step}: refit {ms:7.2f} ms   rel. error vs eager peft {errors[-1]:.1e}")
    return errors


def _best(fn: Callable[[], object], device: torch.device, repeat: int = 30) -> float:
    """The fastest of `repeat` calls, in ms (the machine is shared: the minimum is the
    least disturbed); on a GPU, until the device finishes."""
    cuda = device.type == "cuda"
    fn()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - started))
    return min(times)


def measure(
    backend: str = "inductor",
    hidden: int = 512,
    layers: int = 4,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """The LoRA refit's cost on this machine, in ms, beside a full refit and a flat copy."""
    where = torch.device(device)
    base = small_llama(hidden, layers).to(where, dtype)
    ids = torch.randint(0, 2048, (1, 8), device=where)
    compiled = torchrefit.compile(base, (ids,), backend=backend)
    model = with_lora(base)
    lora = torchrefit.Refitter(compiled, model)
    adapted = list(lora.tensors.values())
    targets = [compiled._torchrefit.store[k] for k in lora.tensors]
    merged = copy.deepcopy(model).merge_and_unload()
    full = torchrefit.Refitter(compiled, merged)
    rows = {
        "Refitter(compiled, peft_model)": _best(lora, where),
        "Refitter(compiled, merged model): every weight": _best(full, where),
        "refit_module_weights(compiled, peft_model, in_place=True)": _best(
            lambda: torchrefit.refit_module_weights(compiled, model, in_place=True), where, 5
        ),
        "copy of the adapted weights (_foreach_copy_)": _best(
            lambda: torch._foreach_copy_(targets, adapted), where
        ),
    }
    megabytes = sum(t.numel() * t.element_size() for t in adapted) / 1e6
    total = compiled._torchrefit.store.nbytes() / 1e6
    print(
        f"Llama, hidden {hidden}, {layers} layers, {dtype} on {device} ({backend}): "
        f"{total:.1f} MB, {megabytes:.1f} MB adapted"
    )
    for label, ms in rows.items():
        print(f"{label:<60} {ms:8.3f} ms")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--hidden", type=int, default=512, help="--measure's model width")
    parser.add_argument("--layers", type=int, default=4, help="--measure's layer count")
    parser.add_argument("--device", default="cpu", help="--measure's device (cuda)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.measure:
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        measure(args.backend, args.hidden, args.layers, args.device, dtype)
    else:
        main(args.backend)
