"""LoRA flows under MutableModule (peft, diffusers): merges, unmerges, scales and switches back
to an adapter seen before are refits; a new adapter branch compiles once; never stale."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import torchrefit
from torchrefit.refit.verify import tolerance

from helpers import assert_matches, run_eager
from models import randomize

peft = pytest.importorskip("peft")

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _counts(steps) -> list[tuple[int, int]]:
    assert all(s.error <= tolerance(torch.float32, torch.float32) for s in steps), steps
    return [(s.compiles, s.refits) for s in steps]


def test_peft_llm_example(one_thread) -> None:
    steps = _example("lora").main(quiet=True)
    assert _counts(steps) == [
        (1, 0),  # adapter one: first call
        (1, 1),  # merged: a refit
        (1, 2),  # unmerged: a refit
        (2, 2),  # set_adapter("two"): the trace runs another branch
        (2, 2),  # set_adapter("one"): that variant again, its weights unchanged
        (2, 3),  # new weights for one
        (2, 4),  # set_scale: a refit of lora_B
        (2, 4),  # a new attribute nobody reads
        (3, 4),  # disable_adapter: the trace skips every branch
        (3, 4),  # enabled again: the variant of "one"
    ]


def test_diffusers_unet_example(one_thread) -> None:
    pytest.importorskip("diffusers")
    steps = _example("lora_diffusers").main(quiet=True)
    assert _counts(steps) == [
        (1, 0),  # first call
        (1, 1),  # fuse_lora (sets lora_scale and _safe_fusing on the model: not read)
        (1, 2),  # unfuse_lora
        (1, 3),  # fuse_lora(lora_scale=0.5): scaled, then merged
        (1, 4),  # unfuse_lora
        (1, 5),  # set_adapters weights=0.7
        (2, 5),  # set_adapters("detail"): another branch
        (2, 5),  # back to "style" at 0.7: its variant, already refitted to 0.7
        (3, 5),  # disable_lora
        (3, 5),  # enable_lora
        (4, 5),  # unload_lora: the LoRA layers are gone, a structure change
    ]


# -- peft on a small MLP: one property each -----------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _inputs():
    return (torch.randn(4, 16),)


def _peft_block(**config) -> torch.nn.Module:
    def lora(seed: int):
        torch.manual_seed(seed)
        return peft.LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False, **config)

    model = peft.get_peft_model(randomize(Block(), 0), lora(1), adapter_name="one").eval()
    model.add_adapter("two", lora(2))
    return model


def _check(mutable: torchrefit.MutableModule, model: torch.nn.Module) -> None:
    x = _inputs()
    assert_matches(mutable(*x), run_eager(model, *x))


def _layers(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_merging_an_adapter_that_is_not_active_recompiles() -> None:
    """Merged, peft skips every branch: the output holds the merged adapter, not the active
    one the graph was traced with. Moving weights cannot make up for that."""
    model = _peft_block(r=4)
    mutable = torchrefit.MutableModule(model, backend="eager")
    _check(mutable, model)
    for layer in _layers(model):
        layer.merge(adapter_names=["two"])
    _check(mutable, model)
    assert mutable.compiles == 2


def test_scales_are_refits_zero_included() -> None:
    model = _peft_block(r=4)
    mutable = torchrefit.MutableModule(model, backend="eager")
    _check(mutable, model)
    for scale in (0.25, 0.0, 3.0):
        for layer in _layers(model):
            layer.set_scale("one", scale)
        _check(mutable, model)
    model.merge_adapter()  # merged at scale 3: the base weight holds that delta
    _check(mutable, model)
    assert mutable.compiles == 1 and mutable.refits == 4


def test_a_dora_scale_is_part_of_the_key() -> None:
    """DoRA's forward uses the scale beyond `lora_B(...) * scale`: a new scale is a new
    variant, and the old scale finds the old one."""
    model = _peft_block(r=4, use_dora=True)
    mutable = torchrefit.MutableModule(model, backend="eager")
    _check(mutable, model)
    for scale in (0.5, 1.0):
        for layer in _layers(model):
            layer.set_scale("one", scale)
        _check(mutable, model)
    assert mutable.compiles == 2


def test_an_adapter_added_after_compiling_recompiles_once() -> None:
    """peft's forward reads which adapters a layer holds (`lora_A.keys()`): adding one is a
    change of what the trace read, even while another is active."""
    model = _peft_block(r=4)
    mutable = torchrefit.MutableModule(model, backend="eager")
    _check(mutable, model)
    torch.manual_seed(3)
    model.add_adapter("three", peft.LoraConfig(target_modules=["fc1"], init_lora_weights=False))
    _check(mutable, model)
    model.set_adapter("three")
    _check(mutable, model)
    model.set_adapter("one")
    _check(mutable, model)
    assert mutable.compiles == 3
