"""Calls unlike the compiled one are refused, and outputs never alias engine weights."""

from __future__ import annotations

import pytest
import torch

import torchrefit


class ScaledMasked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, scale=2.0, mask=None):
        y = self.fc(x) * scale
        return y if mask is None else y * mask


class ReturnsWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w, self.w.t(), self.w * 2, self.w


def test_other_values_shapes_and_arguments_are_refused() -> None:
    model = ScaledMasked().eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(model, (x, 2.0), backend="eager")
    with pytest.raises(torchrefit.InputError, match="specialized"):
        compiled(x, 3.0)
    with pytest.raises(torchrefit.InputError, match="'mask' was not in the example inputs"):
        compiled(x, 2.0, torch.zeros(2, 4))
    with pytest.raises(torchrefit.InputError, match=r"\[2, 4\]"):
        compiled(torch.randn(3, 4), 2.0)
    with pytest.raises(torchrefit.InputError, match="dtype"):
        compiled(x.double(), 2.0)
    with torch.no_grad():
        assert torch.equal(compiled(x, 2.0), model(x, 2.0))


def test_non_contiguous_inputs_compute_right() -> None:
    model = ScaledMasked().eval()
    compiled = torchrefit.compile(model, (torch.randn(2, 4), 2.0))  # Inductor: strides matter
    x = torch.randn(4, 2).t()
    with torch.no_grad():
        assert torch.allclose(compiled(x, 2.0), model(x, 2.0), atol=1e-6)


def test_returned_weights_are_copies_that_follow_refits(tmp_path) -> None:
    a, b = ReturnsWeights().eval(), ReturnsWeights().eval()
    x = torch.randn(2, 4)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    with torch.no_grad():
        for out in compiled(x):
            out.zero_()  # must not reach the engine
        for got, want in zip(compiled(x), a(x), strict=True):
            assert torch.equal(got, want)
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    path = str(tmp_path / "m.trf")
    torchrefit.save(compiled, path)
    with torch.no_grad():
        for module in (compiled, torchrefit.load(path)):
            for got, want in zip(module(x), b(x), strict=True):
                assert torch.equal(got, want)


def test_non_contiguous_parameter_with_inductor() -> None:
    class Transposed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 6).t())

        def forward(self, x):
            return x @ self.w

    a, b = Transposed().eval(), Transposed().eval()
    compiled = torchrefit.compile(a, (torch.randn(3, 6),))
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(compiled(x), a(x), atol=1e-5)
        torchrefit.refit_module_weights(compiled, b, in_place=True)
        assert torch.allclose(compiled(x), b(x), atol=1e-5)
