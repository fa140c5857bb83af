"""Lowering passes: lineage is recorded by the code that makes a constant, and checked."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import torchrefit
from torchrefit.lower import LoweringContext, lower
from torchrefit.lower.check_lineage import check_lineage
from torchrefit.settings import Settings

from cases import CASES
from helpers import assert_matches, run_eager
from models import MLP, randomize


def _lowered(model: torch.nn.Module, inputs: tuple, **settings):
    ep = torch.export.export(model, inputs)
    return lower(ep, LoweringContext(Settings.from_overrides(**settings)))


def test_batch_norm_folding_removes_batch_norm_and_is_exact() -> None:
    case = CASES["conv_bn_folded"]
    model = case.build(0)
    program = _lowered(model, case.inputs(), **case.settings)
    targets = {n.target for n in program.gm.graph.nodes}
    assert torch.ops.aten._native_batch_norm_legit_no_training.default not in targets
    compiled = torchrefit.compile(model, case.inputs(), backend="eager", **case.settings)
    x = case.inputs()
    assert_matches(compiled(*x), run_eager(model, *x))


def test_folding_is_off_by_default() -> None:
    case = CASES["conv_bn"]
    program = _lowered(case.build(0), case.inputs())
    targets = {n.target for n in program.gm.graph.nodes}
    assert torch.ops.aten._native_batch_norm_legit_no_training.default in targets


def test_views_of_weights_stay_in_the_compute_graph() -> None:
    """A transposed linear weight is read in place, not copied into a derived constant."""
    program = _lowered(randomize(MLP(), 0), (torch.randn(2, 16),))
    assert not program.derived
    permutes = [n for n in program.gm.graph.nodes if n.target == torch.ops.aten.permute.default]
    assert permutes and all(program.role(n.args[0]).kind == "weight" for n in permutes)


def test_weight_only_arithmetic_is_hoisted_with_lineage() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))
            self.gain = torch.nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ (self.w * self.gain.exp()).t()

    a, b = Scaled().eval(), Scaled().eval()
    program = _lowered(a, (torch.randn(2, 4),))
    ((key, lineage),) = program.derived.items()
    assert lineage.kind == "program" and set(lineage.sources) == {"w", "gain"}
    compiled = torchrefit.compile(a, (torch.randn(2, 4),), backend="eager")
    refitted = torchrefit.refit_module_weights(compiled, b)
    x = torch.randn(2, 4)
    assert_matches(refitted(x), run_eager(b, x))


def test_weight_math_on_a_view_the_graph_also_reads_stays_in_the_graph() -> None:
    """A view of a weight that compute reads stays in the graph; so does weight-only math
    over it (Qwen2's rotary frequencies in transformers 5.17 made this shape)."""

    class Rotary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("freq", torch.rand(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            view = self.freq.unsqueeze(0)
            return x * view + (view * 2).exp()

    a, b = Rotary().eval(), Rotary().eval()
    compiled = torchrefit.compile(a, (torch.randn(3, 4),), backend="eager")
    x = torch.randn(3, 4)
    assert_matches(compiled(x), run_eager(a, x))
    torchrefit.refit_module_weights(compiled, b.state_dict(), in_place=True)
    assert_matches(compiled(x), run_eager(b, x))


def test_unknown_lineage_is_a_compile_time_error() -> None:
    program = _lowered(randomize(MLP(), 0), (torch.randn(2, 16),))
    graph = program.gm.graph
    first = next(n for n in graph.nodes if n.op == "call_function")
    program.gm.register_buffer("stray", torch.ones(1))
    with graph.inserting_before(first):
        graph.get_attr("stray")
    with pytest.raises(torchrefit.LineageError, match="stray"):
        check_lineage(program, LoweringContext(Settings()))


def test_placeholder_without_role_is_a_compile_time_error() -> None:
    program = _lowered(randomize(MLP(), 0), (torch.randn(2, 16),))
    first = program.placeholders()[0]
    with program.gm.graph.inserting_before(first):
        program.gm.graph.placeholder("mystery")
    with pytest.raises(torchrefit.LineageError, match="mystery"):
        check_lineage(program, LoweringContext(Settings()))


def test_every_engine_constant_has_lineage() -> None:
    for name in ("conv_bn_folded", "bert", "gpt2", "tied_embeddings"):
        case = CASES[name]
        compiled = torchrefit.compile(
            case.build(0), case.inputs(), backend="eager", **case.settings
        )
        keys = {k for child in compiled.children() for k in child.constant_keys}
        assert keys <= set(compiled.weight_map()), name
        for key, lineage in compiled.weight_map().items():
            assert lineage.sources and set(lineage.sources) <= set(compiled._torchrefit.specs), key


def test_lowered_graph_lints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHREFIT_CHECK", "1")
    case = CASES["resnet"]
    program = _lowered(case.build(0), case.inputs())
    assert isinstance(program.gm, fx.GraphModule)
    program.gm.graph.lint()
