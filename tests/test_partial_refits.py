"""Partial refits (issue 20): `strict=False` refits only the weights given, as RL with frozen
layers pushes only what trains; the rest keep their values, derived constants fed by the
given weights are recomputed from them and the sources the engine keeps, or refused by name.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchrefit

from helpers import assert_differs, assert_matches, run_eager
from models import ConvBNWithRunningStats, gpt2, randomize


def _train(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    """A few SGD steps of a language-model loss on the trainable parameters, in place."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()


def _frozen_gpt2() -> nn.Module:
    """GPT-2 with its embeddings and first block frozen, as a fine-tune that trains the top."""
    model = gpt2(0)
    for name, p in model.named_parameters():
        if name.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.")):
            p.requires_grad_(False)
    return model


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _store(compiled: torchrefit.CompiledModule) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in compiled._torchrefit.store.tensors.items()}


def test_a_frozen_transformer_pushes_only_its_trainable_weights() -> None:
    trainer = _frozen_gpt2()
    ids = torch.randint(0, 64, (2, 8))
    compiled = torchrefit.compile(copy.deepcopy(trainer), (ids,), backend="eager")
    before = _store(compiled)
    _train(trainer, ids)
    pushed = {k: v.detach() for k, v in _trainable(trainer).items()}
    assert 0 < len(pushed) < len(dict(trainer.named_parameters()))
    with pytest.raises(torchrefit.MissingWeightError, match="strict=False"):
        torchrefit.refit_module_weights(compiled, pushed)  # strict by default
    refitted = torchrefit.refit_module_weights(compiled, pushed, strict=False)
    x = torch.randint(0, 64, (2, 8))
    assert_matches(refitted(x), run_eager(trainer, x))
    assert_differs(compiled(x), run_eager(trainer, x))  # in_place=False: a copy
    after = refitted._torchrefit.store.tensors
    for key, value in before.items():  # the frozen weights were kept, bit for bit
        if key not in pushed:
            assert torch.equal(after[key], value), key


def test_a_refitter_binds_the_trainable_weights_only() -> None:
    trainer = _frozen_gpt2()
    ids = torch.randint(0, 64, (2, 8))
    compiled = torchrefit.compile(copy.deepcopy(trainer), (ids,), backend="eager")
    refitter = torchrefit.Refitter(compiled, _trainable(trainer), strict=False)
    assert set(refitter.tensors) == set(_trainable(trainer))
    for _ in range(3):  # RL: train, push, generate
        _train(trainer, ids, steps=1)
        refitter()
        x = torch.randint(0, 64, (2, 8))
        assert_matches(compiled(x), run_eager(trainer, x))


def test_a_partial_refit_still_refuses_unknown_names_and_shapes() -> None:
    model = gpt2(0)
    ids = torch.randint(0, 64, (2, 8))
    compiled = torchrefit.compile(model, (ids,), backend="eager")
    weight = model.transformer.h[1].mlp.c_fc.weight.detach()
    with pytest.raises(torchrefit.UnexpectedWeightError, match="does not have.*c_fcc"):
        torchrefit.refit_module_weights(
            compiled, {"transformer.h.1.mlp.c_fcc.weight": weight}, strict=False
        )
    prefixed = {"module.transformer.h.1.mlp.c_fc.weight": weight}
    with pytest.raises(torchrefit.UnexpectedWeightError, match=r"removeprefix\('module\.'\)"):
        torchrefit.refit_module_weights(compiled, prefixed, strict=False)
    with pytest.raises(torchrefit.WeightShapeError, match="c_fc.weight"):
        torchrefit.refit_module_weights(
            compiled, {"transformer.h.1.mlp.c_fc.weight": weight[:, :3]}, strict=False
        )


def test_a_partial_refit_in_place_is_all_or_nothing() -> None:
    model = gpt2(0)
    ids = torch.randint(0, 64, (2, 8))
    compiled = torchrefit.compile(model, (ids,), backend="eager")
    before = compiled(ids)
    new = gpt2(1)
    given = {k: v.detach().clone() for k, v in new.named_parameters() if ".h.1." in k}
    given["transformer.h.1.attn.c_attn.bias"][3] = float("nan")
    with pytest.raises(torchrefit.WeightValueError, match="c_attn.bias"):
        torchrefit.refit_module_weights(compiled, given, strict=False, in_place=True)
    assert torch.equal(compiled(ids).logits, before.logits)


class GatedLinear(nn.Module):
    """`w` read directly (the engine keeps it) and through a hoisted weight-only product with
    `gate` (a derived constant over both): a partial refit of `gate` recomputes the product
    from the new gate and the kept `w`."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.gate = nn.Parameter(torch.randn(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ (self.w * torch.sigmoid(self.gate)).t() + x @ self.w.t()
        return self.head(torch.tanh(y))


def test_a_derived_constant_is_recomputed_from_the_new_and_the_kept_sources() -> None:
    a, b = randomize(GatedLinear(), 0), randomize(GatedLinear(), 1)
    x = torch.randn(4, 8)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    derived = [k for k, v in compiled.weight_map().items() if v.kind == "program"]
    assert derived and "w" in compiled._torchrefit.store.tensors
    refitted = torchrefit.refit_module_weights(compiled, {"gate": b.gate.detach()}, strict=False)
    a.gate.data.copy_(b.gate)  # eager: the new gate, the old w and head
    assert_matches(refitted(x), run_eager(a, x))
    # `w` alone: the product also reads `gate`, which lives only inside it
    with pytest.raises(torchrefit.MissingWeightError, match=r"'~\w+'.*\['gate'\]") as error:
        torchrefit.refit_module_weights(refitted, {"w": b.w.detach()}, strict=False)
    assert error.value.missing == ["gate"]
    refitter = torchrefit.Refitter(refitted, {"gate": b.gate}, strict=False)
    with torch.no_grad():
        b.gate.mul_(-1.0)
    refitter()
    a.gate.data.copy_(b.gate)
    assert_matches(refitted(x), run_eager(a, x))


def _conv_bn(seed: int) -> nn.Module:
    return randomize(ConvBNWithRunningStats(), seed)


def test_a_folded_batch_norm_given_in_part_is_refused_by_name() -> None:
    a, b = _conv_bn(0), _conv_bn(1)
    x = torch.randn(2, 3, 12, 12)
    compiled = torchrefit.compile(a, (x,), backend="eager", fold_batch_norm=True)
    before = compiled(x)
    some = {"bn1.weight": b.bn1.weight.detach(), "bn1.bias": b.bn1.bias.detach()}
    with pytest.raises(torchrefit.MissingWeightError, match=r"~bn_folded:conv1") as error:
        torchrefit.refit_module_weights(compiled, some, strict=False, in_place=True)
    assert {"conv1.weight", "bn1.running_var"} <= set(error.value.missing)
    assert "bn1.weight" not in error.value.missing
    with pytest.raises(torchrefit.MissingWeightError, match=r"~bn_folded:conv1"):
        torchrefit.Refitter(compiled, some, strict=False)  # refused when bound
    assert torch.equal(compiled(x), before)


def test_a_folded_batch_norm_given_with_all_its_sources_is_refolded() -> None:
    a, b = _conv_bn(0), _conv_bn(1)
    x = torch.randn(2, 3, 12, 12)
    compiled = torchrefit.compile(a, (x,), backend="eager", fold_batch_norm=True)
    state = b.state_dict()
    block = {k: v for k, v in state.items() if k.startswith(("conv1.", "bn1."))}
    refitted = torchrefit.refit_module_weights(compiled, block, strict=False)
    a.load_state_dict({**a.state_dict(), **block})  # eager: block 1 new, block 2 and head old
    assert_matches(refitted(x), run_eager(a, x))
    assert_differs(refitted(x), run_eager(b, x))
    keys = refitted._torchrefit.store.tensors
    old = compiled._torchrefit.store.tensors
    assert torch.equal(keys["~bn_folded:conv2.weight"], old["~bn_folded:conv2.weight"])
    assert not torch.equal(keys["~bn_folded:conv1.weight"], old["~bn_folded:conv1.weight"])


def test_a_partial_refitter_does_python_work_independent_of_the_weight_count() -> None:
    from test_refitter_binding import _python_calls, _stack

    counts = {}
    for layers in (4, 64):
        a, b = _stack(layers, 0), _stack(layers, 1)
        x = torch.randn(2, 16)
        compiled = torchrefit.compile(a, (x,), backend="eager")
        half = {k: v for k, v in b.named_parameters() if int(k.split(".")[0]) % 2}
        refitter = torchrefit.Refitter(compiled, half, strict=False)
        refitter()
        refitter()
        counts[layers] = _python_calls(refitter)
        for i, layer in enumerate(a):
            if i % 2:
                layer.load_state_dict(b[i].state_dict())
        assert_matches(compiled(x), run_eager(a, x))
    assert counts[64] == counts[4], counts


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("double_buffer", [False, True])
def test_a_partial_refitter_reads_the_kept_sources_current(device, double_buffer) -> None:
    """The recomputed constant reads the kept `w` from the store (on CUDA from captured
    graphs): after a full refit (and, double-buffered, a flip) it reads the new `w`."""
    a, b = randomize(GatedLinear(), 0).to(device), randomize(GatedLinear(), 1).to(device)
    x = torch.randn(4, 8, device=device)
    backend = "eager" if device == "cpu" else "inductor"
    compiled = torchrefit.compile(a, (x,), backend=backend, double_buffer=double_buffer)
    refitter = torchrefit.Refitter(compiled, {"gate": b.gate}, strict=False)
    for _ in range(3):
        with torch.no_grad():
            b.gate.mul_(-1.0)
            a.gate.copy_(b.gate)
        refitter()
        assert_matches(compiled(x), run_eager(a, x))
        with torch.no_grad():
            a.w.copy_(torch.randn_like(a.w))
        torchrefit.refit_module_weights(compiled, a, in_place=True)
        assert_matches(compiled(x), run_eager(a, x))
