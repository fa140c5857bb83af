"""Data-dependent shapes and control flow: what Inductor cannot build runs in PyTorch on its
own (boolean masks, nonzero, unique, .item(), torch.cond, while_loop, map), gives eager's
results call after call, refits and saves; what cannot compile is refused at compile time
with a fix that works (each fix is compiled here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._higher_order_ops.map import map as map_hop
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import torchrefit
from torchrefit.engine import InductorBackend
from torchrefit.engine.base import data_dependent
from torchrefit.errors import ExportError, IncompatibleWeightsError, UnsupportedGraphError
from torchrefit.graph_io import resolve_target
from torchrefit.lower import LoweringContext, lower
from torchrefit.partition import ENGINE, Capability, partition
from torchrefit.settings import Settings

from helpers import assert_differs, assert_matches, run_eager

Inputs = Callable[[int], tuple[Any, ...]]


class MaskedConvNet(torch.nn.Module):
    """Conv (engine), a boolean-mask select of pixels (PyTorch), a linear over the selection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x).relu()
        pixels = y.flatten(2).transpose(1, 2).reshape(-1, 4)
        chosen = pixels[pixels.sum(1) > 0.5]
        return self.head(chosen), y.mean()


class Nonzero(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(self.lin(x) > 0)


class MaskedSelect(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return torch.masked_select(y, y > 0) * 3


class Unique(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.unique((self.lin(x) * 2).round())


class ItemSized(torch.nn.Module):
    """A size read from a tensor with .item(), bounded with torch._check."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        k = n.item()
        torch._check(k >= 0)
        torch._check(k <= 6)
        return self.lin(x)[:, :k] * torch.arange(k, dtype=x.dtype)


class CondNet(torch.nn.Module):
    """torch.cond on the data, a weight in each branch, a linear before it."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(6, 6)
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return torch.cond(h.sum() > 0, lambda h: self.a(h).relu(), lambda h: self.b(h) - 1, (h,))


class WhileNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        def body(i: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return i + 1, torch.tanh(self.lin(y))

        return while_loop(lambda i, y: i < steps, body, (torch.zeros_like(steps), x))[1]


class MapNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return map_hop(lambda x, w: x @ w, xs, self.lin.weight)


def _rows(i: int) -> tuple[torch.Tensor]:
    return (torch.randn(4, 6),)


def _cond_inputs(i: int) -> tuple[torch.Tensor]:
    return (torch.randn(3, 6) + (2.0 if i % 2 else -2.0),)  # both branches, call after call


def _check_calls(compiled: Any, model: torch.nn.Module, inputs: Inputs) -> set[Any]:
    """Eager's results on fresh inputs over several calls; the output shapes seen."""
    shapes = set()
    for i in range(4):
        args = inputs(i)
        got = run_eager(compiled, *args)
        assert_matches(got, run_eager(model, *args))
        shapes.add(tuple(t.shape for t in torch.utils._pytree.tree_leaves(got)))
    return shapes


def _check_refit_and_save(
    compiled: Any, model: torch.nn.Module, new: torch.nn.Module, inputs: Inputs, path: Path
) -> None:
    """A refit reaches every weight (engines, fallbacks, branches); save and load keep it."""
    assert_differs(run_eager(new, *inputs(0)), run_eager(model, *inputs(0)))
    torchrefit.refit_module_weights(compiled, new.state_dict(), in_place=True)
    _check_calls(compiled, new, inputs)
    torchrefit.save(compiled, str(path))
    _check_calls(torchrefit.load(str(path)), new, inputs)


def _fresh(cls: type[torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def test_mask_select_between_engines_runs_in_pytorch(tmp_path: Path) -> None:
    model = _fresh(MaskedConvNet, 0)
    inputs: Inputs = lambda i: (torch.randn(1, 3, 4, 4),)  # noqa: E731
    compiled = torchrefit.compile(model, inputs(0))
    assert compiled.engines() and compiled.fallbacks()
    assert len(_check_calls(compiled, model, inputs)) > 1  # the mask selects other counts
    _check_refit_and_save(compiled, model, _fresh(MaskedConvNet, 1), inputs, tmp_path / "m.trf")


@pytest.mark.parametrize(
    ("cls", "inputs"),
    [
        (Nonzero, _rows),
        (MaskedSelect, _rows),
        (Unique, _rows),
        (ItemSized, lambda i: (torch.randn(2, 6), torch.tensor(2 + i))),
    ],
    ids=["nonzero", "masked_select", "unique", "item"],
)
def test_data_dependent_ops_compile_with_inductor(
    cls: type[torch.nn.Module], inputs: Inputs, tmp_path: Path
) -> None:
    model = _fresh(cls, 0)
    compiled = torchrefit.compile(model, inputs(0))
    assert compiled.engines() and compiled.fallbacks()  # the linear is still compiled
    assert len(_check_calls(compiled, model, inputs)) > 1
    _check_refit_and_save(compiled, model, _fresh(cls, 1), inputs, tmp_path / "m.trf")


def test_cond_runs_in_pytorch_with_refittable_branch_weights(tmp_path: Path) -> None:
    model = _fresh(CondNet, 0)
    compiled = torchrefit.compile(model, _cond_inputs(0))
    assert compiled.engines()  # `pre` and the predicate
    _check_calls(compiled, model, _cond_inputs)
    _check_refit_and_save(compiled, model, _fresh(CondNet, 1), _cond_inputs, tmp_path / "c.trf")
    copy = torchrefit.refit_module_weights(compiled, _fresh(CondNet, 2).state_dict())
    _check_calls(copy, _fresh(CondNet, 2), _cond_inputs)  # a clone keeps its branches
    _check_calls(compiled, _fresh(CondNet, 1), _cond_inputs)


@pytest.mark.parametrize(
    ("cls", "inputs"),
    [
        (WhileNet, lambda i: (torch.randn(2, 6), torch.tensor(i + 1))),
        (MapNet, lambda i: (torch.randn(3, 2, 6),)),
    ],
    ids=["while_loop", "map"],
)
def test_loops_run_in_pytorch(cls: type[torch.nn.Module], inputs: Inputs, tmp_path: Path) -> None:
    model = _fresh(cls, 0)
    compiled = torchrefit.compile(model, inputs(0), backend="eager")
    _check_calls(compiled, model, inputs)
    _check_refit_and_save(compiled, model, _fresh(cls, 1), inputs, tmp_path / "l.trf")


def test_engines_never_see_a_data_dependent_size() -> None:
    """Every op of an Inductor partition has sizes known from the inputs' shapes alone."""
    model = _fresh(MaskedConvNet, 0)
    program = torch.export.export(model, (torch.randn(1, 3, 4, 4),))
    lowered = lower(program, LoweringContext(Settings()))
    assert any(data_dependent(n) for n in lowered.gm.graph.nodes)
    parts = partition(lowered.gm, Settings(), Capability(frozenset(), InductorBackend().supports))
    engines = [getattr(parts.top, name) for name, k in parts.kinds.items() if k == ENGINE]
    assert engines
    for sub in engines:
        assert not any(data_dependent(n) for n in sub.graph.nodes), sub.graph


class PythonIf(torch.nn.Module):
    def __init__(self, with_cond: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.with_cond = with_cond

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.with_cond:  # the fix the error names
            return torch.cond(h.sum() > 0, lambda h: h * 2, lambda h: h - 1, (h,))
        if h.sum() > 0:
            return h * 2
        return h - 1


def test_python_branch_on_data_is_refused_naming_torch_cond() -> None:
    torch.manual_seed(0)
    model = PythonIf(with_cond=False).eval()
    with pytest.raises(ExportError, match=r"torch\.cond\(pred") as info:
        torchrefit.compile(model, _cond_inputs(0), backend="eager")
    assert "if h.sum() > 0" in str(info.value)  # the line of the user's code
    model.with_cond = True
    _check_calls(torchrefit.compile(model, _cond_inputs(0), backend="eager"), model, _cond_inputs)


class IntOfItem(torch.nn.Module):
    def __init__(self, checked: bool) -> None:
        super().__init__()
        self.checked = checked

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if self.checked:  # the fix the error names
            k = n.item()
            torch._check(k >= 0)
            torch._check(k <= 8)
        else:
            k = int(n.item())
        return torch.arange(k, dtype=x.dtype) * x.sum()


def test_int_of_item_is_refused_naming_torch_check() -> None:
    inputs: Inputs = lambda i: (torch.randn(3), torch.tensor(i + 2))  # noqa: E731
    with pytest.raises(ExportError, match=r"torch\._check\(n >= 0\)"):
        torchrefit.compile(IntOfItem(checked=False), inputs(0), backend="eager")
    model = IntOfItem(checked=True)
    assert len(_check_calls(torchrefit.compile(model, inputs(0)), model, inputs)) > 1


class NestedCond(torch.nn.Module):
    def __init__(self, with_where: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.with_where = with_where

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        if self.with_where:  # the fix the error names
            return torch.where(h.mean() > 0, h * 2, h * 3)
        return torch.cond(h.mean() > 0, lambda h: h * 2, lambda h: h * 3, (h,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: self.inner(self.lin(x)), lambda x: x - 1, (x,))


def test_nested_cond_is_refused_at_compile_naming_torch_where() -> None:
    torch.manual_seed(0)
    model = NestedCond(with_where=False).eval()
    with pytest.raises(UnsupportedGraphError, match=r"true_graph_0.*torch\.where"):
        torchrefit.compile(model, _cond_inputs(0), backend="eager")
    model.with_where = True
    _check_calls(torchrefit.compile(model, _cond_inputs(0), backend="eager"), model, _cond_inputs)


class ScanNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        def step(carry: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = carry + self.lin(x)
            return y, y.clone()

        return scan(step, torch.zeros(2, 6), xs)[1]


def test_a_higher_order_op_that_cannot_be_stored_is_refused_at_save(tmp_path: Path) -> None:
    model = _fresh(ScanNet, 0)
    inputs: Inputs = lambda i: (torch.randn(3, 2, 6),)  # noqa: E731
    compiled = torchrefit.compile(model, inputs(0), backend="eager")
    _check_calls(compiled, model, inputs)
    with pytest.raises(UnsupportedGraphError, match=r"torch\.ops\.higher_order\.scan"):
        torchrefit.save(compiled, str(tmp_path / "s.trf"))
    assert not (tmp_path / "s.trf").exists()


class Branches(torch.nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: self.act(self.lin(x)), lambda x: self.lin(x), (x,))


def test_branch_ops_are_structure() -> None:
    """A program whose branches differ is another architecture, though its weights match."""
    x = _cond_inputs(1)
    compiled = torchrefit.compile(Branches(torch.relu), x, backend="eager")
    other = torch.export.export(Branches(torch.tanh), x)
    with pytest.raises(IncompatibleWeightsError, match="tanh"):
        torchrefit.refit_module_weights(compiled, other, in_place=True)


def test_stored_higher_order_targets_are_allow_listed() -> None:
    assert resolve_target("torch.ops.higher_order.cond") is torch.ops.higher_order.cond
    for name in ("torch.ops.higher_order.scan", "torch.ops.higher_order.cond.x", "torch.ops.x"):
        with pytest.raises(UnsupportedGraphError):
            resolve_target(name)


class CountingCond(torch.nn.Module):
    """A buffer updated in one branch of a torch.cond."""

    def __init__(self, written_outside: bool) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(6))
        self.written_outside = written_outside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.written_outside:  # the fix the error names
            y, seen = torch.cond(
                x.sum() > 0,
                lambda x, n: (x * 2, n + x.sum(0)),
                lambda x, n: (x - 1, n.clone()),
                (x, self.seen),
            )
            self.seen.copy_(seen)
            return y

        def counting(x: torch.Tensor) -> torch.Tensor:
            self.seen.add_(x.sum(0))
            return x * 2

        return torch.cond(x.sum() > 0, counting, lambda x: x - 1, (x,))


def test_state_written_in_a_branch_is_refused_at_compile() -> None:
    with pytest.raises(UnsupportedGraphError, match=r"self\.n\.copy_\(n\)"):
        torchrefit.compile(CountingCond(written_outside=False), _cond_inputs(0), backend="eager")
    model, twin = CountingCond(written_outside=True), CountingCond(written_outside=True)
    compiled = torchrefit.compile(model, _cond_inputs(0), backend="eager")
    for i in range(4):  # the state each call leaves is eager's, whichever branch ran
        x = _cond_inputs(i)
        assert_matches(run_eager(compiled, *x), run_eager(twin, *x))
        assert_matches(compiled._torchrefit.store["seen"], twin.seen)
    assert twin.seen.abs().sum() > 0
