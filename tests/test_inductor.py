"""A representative set through the Inductor backend (engines are compiled once per session)."""

from __future__ import annotations

import pytest
import torch

import torchrefit

from cases import CASES
from helpers import assert_differs, assert_matches, run_eager
from models import ConvNet, randomize

pytestmark = pytest.mark.inductor


@pytest.mark.parametrize("name", ["conv_bn_folded", "bert", "gpt2"])
def test_inductor_refit_matches_eager(inductor_modules, name: str) -> None:
    a, compiled = inductor_modules[name]
    case = CASES[name]
    x = case.inputs()
    assert_matches(compiled(*x), run_eager(a, *x))
    b = case.build(1)
    refitted = torchrefit.refit_module_weights(compiled, b)
    x = case.inputs()
    assert_matches(refitted(*x), run_eager(b, *x))
    assert_differs(refitted(*x), run_eager(a, *x))
    assert_matches(compiled(*x), run_eager(a, *x))


def test_inductor_fast_and_slow_paths_with_verification(inductor_modules) -> None:
    a, compiled = inductor_modules["conv_bn_folded"]
    case = CASES["conv_bn_folded"]
    for seed, use_cache in ((2, True), (3, False)):
        b = case.build(seed)
        x = case.inputs()
        ep = torch.export.export(b, x)
        refitted = torchrefit.refit_module_weights(
            compiled, ep, arg_inputs=x, verify_output=True, use_weight_map_cache=use_cache
        )
        y = case.inputs()
        assert_matches(refitted(*y), run_eager(b, *y))


def test_inductor_three_refits_in_place_then_save_load_refit(inductor_modules, tmp_path) -> None:
    a, compiled = inductor_modules["gpt2"]
    case = CASES["gpt2"]
    module = torchrefit.refit_module_weights(compiled, a)  # a private copy to refit in place
    for seed in (4, 5, 6):
        b = case.build(seed)
        torchrefit.refit_module_weights(module, b.state_dict(), in_place=True)
        x = case.inputs()
        assert_matches(module(*x), run_eager(b, *x))
    path = str(tmp_path / "gpt2.trf")
    torchrefit.save(module, path)
    loaded = torchrefit.load(path)
    x = case.inputs()
    assert_matches(loaded(*x), run_eager(b, *x))
    c = case.build(7)
    torchrefit.refit_module_weights(loaded, c, in_place=True)
    assert_matches(loaded(*x), run_eager(c, *x))


def test_inductor_engines_and_fallbacks_with_dynamic_batch() -> None:
    a, b = randomize(ConvNet(), 0), randomize(ConvNet(), 1)
    batch = torch.export.Dim("batch", min=1, max=32)
    x = (torch.randn(2, 3, 10, 10),)
    export = lambda m: torch.export.export(m, x, dynamic_shapes=({0: batch},))  # noqa: E731
    compiled = torchrefit.compile(
        export(a), x, torch_executed_ops={"torch.ops.aten.convolution.default"}, backend="inductor"
    )
    assert len(compiled.engines()) >= 2 and len(compiled.fallbacks()) >= 2
    refitted = torchrefit.refit_module_weights(compiled, export(b))
    for n in (3, 9):
        y = (torch.randn(n, 3, 10, 10),)
        assert_matches(refitted(*y), run_eager(b, *y))
        assert_differs(refitted(*y), run_eager(a, *y))


def test_inductor_options_are_config_patches() -> None:
    model = torch.nn.Linear(8, 8).eval()
    x = torch.randn(2, 8)
    compiled = torchrefit.compile(model, (x,), inductor_options=(("fallback_random", True),))
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)


def test_argument_names_are_not_structure_and_ranges_key_the_cache(tmp_path, monkeypatch) -> None:
    """Same model, forward argument renamed: one fingerprint, the fast path; another dynamic
    range: another cache entry."""
    from torch.export import Dim

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    class Renamed(Named):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return self.fc(inputs)

    a, b = Named().eval(), Renamed().eval()
    ea = torch.export.export(
        a, (torch.randn(3, 4),), dynamic_shapes={"x": {0: Dim("batch", max=64)}}
    )
    eb = torch.export.export(
        b, (torch.randn(3, 4),), dynamic_shapes={"inputs": {0: Dim("n", max=64)}}
    )
    compiled = torchrefit.compile(
        ea, (torch.randn(3, 4),), backend="eager", cache_dir=str(tmp_path)
    )
    import torchrefit.refit.match as match

    with monkeypatch.context() as patch:
        patch.setattr(
            match, "lower", lambda *a, **k: (_ for _ in ()).throw(AssertionError("slow path"))
        )
        refitted = torchrefit.refit_module_weights(compiled, eb)  # the fast path
    x = torch.randn(5, 4)
    assert torch.allclose(refitted(x), b(x))
    ec = torch.export.export(
        a, (torch.randn(3, 4),), dynamic_shapes={"x": {0: Dim("batch", max=16)}}
    )
    torchrefit.compile(ec, (torch.randn(3, 4),), backend="eager", cache_dir=str(tmp_path))
    torchrefit.compile(eb, (torch.randn(3, 4),), backend="eager", cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.trf"))) == 2  # ranges 64 (twice, one entry) and 16


def test_small_batched_products_become_sums_even_when_chained() -> None:
    """The exact-shape rewrite: bmm of at most 8 rows -> product and sum, also where one such
    product feeds another (shapes are read before any node is rewritten); values unchanged,
    larger products left to the library call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torchrefit.engine.inductor import _small_products

    def f(h: torch.Tensor, big: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.bmm(torch.bmm(h, h.transpose(1, 2)), h), torch.bmm(big, big.transpose(1, 2))

    h, big = torch.randn(3, 4, 16), torch.randn(2, 12, 5)
    gm = make_fx(f)(h, big)
    rewritten = _small_products(gm, [h, big])
    bmms = [n for n in rewritten.graph.nodes if n.target is torch.ops.aten.bmm.default]
    assert len(bmms) == 1  # only the 12-row product stays a bmm
    for got, want in zip(rewritten(h, big), f(h, big), strict=True):
        assert_matches(got, want)
