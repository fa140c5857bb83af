"""Forwards that write state, with eager semantics: buffers the forward updates are the
compiled module's state (kept across refits), inputs written in place are written in the
caller's tensors, and what cannot be compiled is refused at compile time."""

from __future__ import annotations

import copy

import pytest
import torch

import torchrefit

from helpers import assert_matches


class Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x) * self.calls


class RunningMean(torch.nn.Module):
    """An exponential moving average of its inputs, read back into the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.fc(x - self.mean)


class WritesInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        scratch.mul_(2).add_(x)
        return self.fc(scratch)


def _calls(model, compiled, make_inputs, n=4):
    eager = copy.deepcopy(model)
    for _ in range(n):
        inputs = make_inputs()
        theirs = tuple(t.clone() for t in inputs)
        assert_matches(compiled(*inputs), eager(*theirs))
        for mine, eager_input in zip(inputs, theirs, strict=True):
            assert torch.equal(mine, eager_input), "an input written in place differs from eager's"
    return eager


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.inductor)])
@pytest.mark.parametrize("cls", [Counter, RunningMean, WritesInput])
def test_state_writes_match_eager_over_several_calls(backend: str, cls) -> None:
    model = cls().eval()
    make = (
        (lambda: (torch.randn(3, 4), torch.randn(3, 4)))
        if cls is WritesInput
        else (lambda: (torch.randn(3, 4),))
    )
    compiled = torchrefit.compile(model, make(), backend=backend)
    eager = _calls(model, compiled, make)
    for name, buffer in eager.named_buffers():
        assert torch.equal(compiled._torchrefit.store[name], buffer), name


def test_refits_keep_the_state_a_forward_wrote() -> None:
    model = Counter().eval()
    x = torch.randn(3, 4)
    compiled = torchrefit.compile(model, (x,), backend="eager")
    eager = _calls(model, compiled, lambda: (torch.randn(3, 4),), n=3)
    new = Counter().eval()
    torchrefit.refit_module_weights(compiled, new, in_place=True)  # new.calls is 0: not taken
    eager.fc.load_state_dict(new.fc.state_dict())
    assert_matches(compiled(x), eager(x))
    assert compiled.weight_map()["calls"].kind == "state"


def test_state_survives_save_and_load(tmp_path) -> None:
    model = Counter().eval()
    compiled = torchrefit.compile(model, (torch.randn(3, 4),), backend="eager")
    eager = _calls(model, compiled, lambda: (torch.randn(3, 4),), n=2)
    path = str(tmp_path / "counter.trf")
    torchrefit.save(compiled, path)
    loaded = torchrefit.load(path)
    x = torch.randn(3, 4)
    assert_matches(loaded(x), eager(x))


def test_batch_norm_in_training_mode_is_refused_at_compile_time() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    with pytest.raises(torchrefit.UnsupportedGraphError, match=r"model\.eval\(\)") as info:
        torchrefit.compile(model, (torch.randn(3, 4),), backend="eager")
    assert "running_mean" in str(info.value)
    compiled = torchrefit.compile(model.eval(), (torch.randn(3, 4),), backend="eager")
    x = torch.randn(3, 4)
    assert_matches(compiled(x), model(x))


def _tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def test_a_transformers_cache_output_gets_advice_that_works() -> None:
    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(torchrefit.ExportError, match="use_cache"):
        torchrefit.compile(model, (ids,), backend="eager")
    compiled = torchrefit.compile(
        model, (ids,), {"use_cache": False}, backend="eager"
    )  # the advice
    assert_matches(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
