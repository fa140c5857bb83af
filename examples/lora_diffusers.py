"""diffusers' LoRA flow on a (tiny, random) UNet under MutableModule: fuse_lora, unfuse_lora and
set_adapters weights are refits; a new adapter branch, disable_lora and unload_lora recompile,
once each; what diffusers sets on the model but the traced forward never reads
(`lora_scale`, `_safe_fusing`, `_hf_peft_config_loaded`) does not.

.venv/bin/python examples/lora_diffusers.py [--backend inductor]

Backend: eager by default, because this example is about which changes recompile and which
are refits, and it compiles four variants of a UNet: with the eager backend the engines run
the compiled graphs op by op and the run takes about 19 s on a 2-core CPU, against about
50 s with Inductor (torchrefit's default, what you deploy). Refits, compile counts and
errors against eager are the same for both. `--backend inductor` runs it with Inductor.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

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


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def lora(seed: int) -> LoraConfig:
    torch.manual_seed(seed)  # init_lora_weights=False: random adapter weights, seeded
    return LoraConfig(
        r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )


def main(backend: str = "eager", quiet: bool = False) -> list[Step]:
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.add_adapter(lora(1), adapter_name="style")
    unet.add_adapter(lora(2), adapter_name="detail")
    unet.set_adapters("style")
    mutable = torchrefit.MutableModule(unet, backend=backend)
    steps: list[Step] = []
    if not quiet:
        print(f"backend: {backend}")

    def call(label: str) -> None:
        sample, timestep = torch.randn(1, 4, 8, 8), torch.tensor([10])
        text = torch.randn(1, 3, 16)
        started = time.perf_counter()
        out = mutable(sample, timestep, text).sample
        ms = 1e3 * (time.perf_counter() - started)
        with torch.no_grad():
            error = relative_error(out, unet(sample, timestep, text).sample)
        steps.append(Step(label, mutable.compiles, mutable.refits, ms, error))
        if not quiet:
            print(steps[-1])

    call("adapter style: first call")
    unet.fuse_lora()
    call("fuse_lora()")
    unet.unfuse_lora()
    call("unfuse_lora()")
    unet.fuse_lora(lora_scale=0.5)
    call("fuse_lora(lora_scale=0.5)")
    unet.unfuse_lora()
    call("unfuse_lora()")
    unet.set_adapters("style", weights=0.7)
    call("set_adapters('style', weights=0.7)")
    unet.set_adapters("detail")
    call("set_adapters('detail')")
    unet.set_adapters("style", weights=0.7)
    call("set_adapters('style'): seen before")
    unet.disable_lora()
    call("disable_lora()")
    unet.enable_lora()
    call("enable_lora()")
    unet.unload_lora()
    call("unload_lora(): LoRA layers removed")
    if not quiet:
        print(f"{mutable.compiles} compiles and {mutable.refits} refits in {len(steps)} calls")
    return steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    main(parser.parse_args().backend)
