"""LoRA with peft under MutableModule: merging and unmerging an adapter is a refit.

.venv/bin/python examples/lora.py
"""

from __future__ import annotations

import time

import peft
import torch
from transformers import BertConfig, BertModel

import torchrefit
from torchrefit.refit.verify import relative_error


def main() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512
    )
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False
    )
    model = peft.get_peft_model(BertModel(config).eval(), lora).eval()
    mutable = torchrefit.MutableModule(model)
    ids = torch.randint(0, config.vocab_size, (2, 32))

    def call(label: str) -> None:
        compiles, refits = mutable.compiles, mutable.refits
        started = time.perf_counter()
        out = mutable(ids)
        elapsed = 1e3 * (time.perf_counter() - started)
        with torch.no_grad():
            err = relative_error(out.last_hidden_state, model(ids).last_hidden_state)
        what = (
            "compiled"
            if mutable.compiles > compiles
            else "refitted"
            if mutable.refits > refits
            else "ran"
        )
        print(f"{label:<22} {what:<9} {elapsed:9.1f} ms   rel. error vs eager {err:.1e}")

    call("first call")
    for round_ in range(2):
        model.merge_adapter()
        call(f"merged ({round_ + 1})")
        model.unmerge_adapter()
        call(f"unmerged ({round_ + 1})")
    with torch.no_grad():  # train the adapter a little: new LoRA weights
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))
    call("new adapter weights")
    model.merge_adapter()
    call("new adapter merged")


if __name__ == "__main__":
    main()
