"""A peft LLM under MutableModule: what recompiles (adapter branches the trace has not seen)
and what is a refit (merges, unmerges, new adapter weights, scales).

.venv/bin/python examples/lora.py [--backend inductor]

Backend: eager by default, because this example is about which changes recompile and which
are refits, and it compiles three variants: with the eager backend the engines run the
compiled graphs op by op and the run takes about 9 s on a 2-core CPU, against about 23 s
with Inductor (torchrefit's default, what you deploy; its first compile alone takes 11 s).
Refits, compile counts and errors against eager are the same for both. `--backend inductor`
runs it with Inductor.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchrefit
from torchrefit.refit.verify import relative_error


@dataclass
class Step:
    label: str
    compiles: int  # totals after the step
    refits: int
    ms: float
    error: float  # relative error against eager PyTorch running the same model state

    def __str__(self) -> str:
        return (
            f"{self.label:<34} compiles {self.compiles}  refits {self.refits:<3}"
            f"{self.ms:9.1f} ms   rel. error vs eager {self.error:.1e}"
        )


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def lora(seed: int) -> peft.LoraConfig:
    torch.manual_seed(seed)  # init_lora_weights=False: random adapter weights, seeded
    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def main(backend: str = "eager", quiet: bool = False) -> list[Step]:
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), lora(1), adapter_name="one").eval()
    model.add_adapter("two", lora(2))
    mutable = torchrefit.MutableModule(model, backend=backend)
    steps: list[Step] = []
    if not quiet:
        print(f"backend: {backend}")

    def call(label: str) -> None:
        ids = torch.randint(0, 128, (2, 16))
        started = time.perf_counter()
        out = mutable(ids)
        ms = 1e3 * (time.perf_counter() - started)
        with torch.no_grad():
            error = relative_error(out.logits, model(ids).logits)
        steps.append(Step(label, mutable.compiles, mutable.refits, ms, error))
        if not quiet:
            print(steps[-1])

    call("adapter one: first call")
    model.merge_adapter()
    call("one merged")
    model.unmerge_adapter()
    call("one unmerged")
    model.set_adapter("two")
    call("set_adapter('two'): another branch")
    model.set_adapter("one")
    call("set_adapter('one'): seen before")
    with torch.no_grad():  # train adapter one a little: new LoRA weights
        for name, p in model.named_parameters():
            if "lora_" in name and ".one." in name:
                p.add_(0.01 * torch.randn_like(p))
    call("new weights for one")
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_scale("one", 0.5)
    call("one at scale 0.5")
    model.foo_bar = True  # a new attribute the forward does not read
    call("a new plain attribute")
    with model.disable_adapter():
        call("adapters disabled")
    call("enabled again")
    if not quiet:
        print(f"{mutable.compiles} compiles and {mutable.refits} refits in {len(steps)} calls")
    return steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    main(parser.parse_args().backend)
