"""A Refitter bound directly to a wrapped trainer (issue 20): DDP (`module.`), FSDP
(`_fsdp_wrapped_module.`; FSDP2's DTensors, names unchanged) and peft (`base_model.model.`,
in test_peft_refit.py), with a prefix map, through real training steps. Real wrappers on CPU
over a Gloo group of one process."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchrefit

from helpers import assert_differs, assert_matches, run_eager
from models import MLP, randomize

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    """A Gloo process group of this one process (no port: an in-memory store)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _step(trainer: nn.Module, seed: int) -> None:
    """One SGD step through the wrapper (its forward, backward and hooks)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, generator=gen)
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.5)
    optimizer.zero_grad()
    trainer(x).square().mean().backward()
    optimizer.step()


def _check_through_training(trainer: nn.Module, plain: nn.Module, **binding) -> None:
    """Compile the plain model, bind the wrapped trainer, and follow three training steps;
    `plain` is the wrapped module (eager reference)."""
    x = torch.randn(4, 16)
    compiled = torchrefit.compile(copy.deepcopy(plain), (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, trainer, **binding)
    for seed in range(3):
        _step(trainer, seed)
        refitter()
        x = torch.randn(4, 16)
        assert_matches(compiled(x), run_eager(plain, x))
    assert_differs(compiled(x), run_eager(randomize(MLP(), 0), x))


def test_ddp_binds_with_its_prefix_mapped(group) -> None:
    model = randomize(MLP(), 0)
    ddp = nn.parallel.DistributedDataParallel(model)
    assert next(iter(dict(ddp.named_parameters()))).startswith("module.")
    _check_through_training(ddp, model, name_map=lambda n: n.removeprefix("module."))
    # unmapped, the names are explained as a prefix to strip
    compiled = torchrefit.compile(copy.deepcopy(model), (torch.randn(4, 16),), backend="eager")
    with pytest.raises(torchrefit.UnexpectedWeightError, match=r"removeprefix\('module\.'\)"):
        torchrefit.Refitter(compiled, ddp)


def test_fsdp_binds_with_its_prefix_mapped(group) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = randomize(MLP(), 0)
    fsdp = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    assert "_fsdp_wrapped_module.fc1.weight" in dict(fsdp.named_parameters())
    _check_through_training(fsdp, model, name_map=lambda n: n.replace("_fsdp_wrapped_module.", ""))


def test_fsdp2_dtensors_bind_as_their_local_tensors(group) -> None:
    from torch.distributed.fsdp import fully_shard

    model = randomize(MLP(), 0)
    reference = copy.deepcopy(model)
    fully_shard(model)
    assert type(model.fc1.weight).__name__ == "DTensor"
    x = torch.randn(4, 16)
    compiled = torchrefit.compile(reference, (x,), backend="eager")
    refitter = torchrefit.Refitter(compiled, model)
    for seed in range(3):
        _step(model, seed)
        refitter()
        with torch.no_grad():  # the eager reference: the trainer's weights, gathered
            for name, p in reference.named_parameters():
                p.copy_(dict(model.named_parameters())[name].full_tensor())
        x = torch.randn(4, 16)
        assert_matches(compiled(x), run_eager(reference, x))
    refitted = torchrefit.refit_module_weights(compiled, model.state_dict())
    assert_matches(refitted(x), run_eager(reference, x))
