"""One rule for models in training mode (issue 16 item 8): a compile that would run
training-only behaviour (dropout drawing random masks, batch norm updating its statistics)
is refused with the fix; `verify_output=True` against a trainer in training mode compares
with its eval-mode forward, the semantics the engines were compiled with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchrefit

from helpers import assert_matches, run_eager


class WithDropout(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


def test_dropout_in_training_mode_is_refused_naming_it_and_the_fix() -> None:
    model = WithDropout(0).train()
    with pytest.raises(torchrefit.UnsupportedGraphError, match=r"'drop'.*model\.eval\(\)"):
        torchrefit.compile(model, (torch.randn(2, 8),), backend="eager")
    model.eval()
    compiled = torchrefit.compile(model, (torch.randn(2, 8),), backend="eager")
    x = torch.randn(2, 8)
    assert torch.equal(compiled(x), compiled(x))
    assert_matches(compiled(x), run_eager(model, x))


def test_a_transformers_model_built_from_a_config_is_refused_until_eval() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = transformers.BertModel(config)
    assert model.training  # as transformers builds it
    ids = torch.randint(0, 100, (2, 6))
    with pytest.raises(torchrefit.UnsupportedGraphError, match=r"model\.eval\(\)"):
        torchrefit.compile(model, (ids,), backend="eager")
    mutable = torchrefit.MutableModule(model, backend="eager")
    with pytest.raises(torchrefit.UnsupportedGraphError, match=r"model\.eval\(\)"):
        mutable(ids)


def test_verify_output_against_a_trainer_in_training_mode() -> None:
    a, b = WithDropout(0).eval(), WithDropout(1).train()  # the trainer stays in training mode
    x = torch.randn(4, 8)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    refitted = torchrefit.refit_module_weights(compiled, b, arg_inputs=(x,), verify_output=True)
    assert b.training and b.drop.training  # left as it was
    assert_matches(refitted(x), run_eager(b.eval(), x))
