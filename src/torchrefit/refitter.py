"""A refit bound to fixed source tensors: read and matched once, then each call evaluates,
checks and commits their current values through the refit core, replayed as one CUDA graph
per target bank where it can be (the weight program, the check, the gated or flagged copy).

For loops that update weights in place (an optimizer's step, an RL learner, a pinned host
buffer refilled from a checkpoint) and push them into inference every few steps. A peft
model bound to an engine of its base model is merged first, each call (`lora.LoraMerge`,
one batched product per group of like layers, captured as a CUDA graph where it can be),
and only its adapted layers are refitted.

A call's host work is O(1) in the number of weights: whether a bound tensor was replaced
(`module.w = Parameter(...)`, `load_state_dict(..., assign=True)`) is known from torch's
registration hooks, which bump one counter; whether one's memory moved (`w.data = ...`) is
one C-level comparison of the bound data pointers with a snapshot.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .errors import TorchRefitError, WeightDtypeError, WeightShapeError, WeightValueError
from .lora import LoraMerge
from .module import CompiledModule
from .refit import refittable
from .refit.commit import commit, commit_by
from .refit.evaluate import (
    Values,
    by_dtype,
    check_layout,
    evaluate,
    finite_groups,
    raise_nonfinite,
)
from .refit.match import Matched, fast
from .refit.read import NameMap, peft_merge, read
from .refit.transfer import Transfer, floating
from .weights import WeightStore

logger = logging.getLogger("torchrefit")


class Refitter:
    """`Refitter(compiled, weights)()` refits `compiled` from `weights`' current values.

    `weights` is an nn.Module or a state_dict; its tensors are bound once (by identity, not
    by name): a bound tensor that is replaced or whose memory moves is refused (make a new
    Refitter). `name_map` renames the weights' names to the compiled model's, as for
    `refit_module_weights` (a dict, or a function; None from it drops a name): a DDP, FSDP
    or peft wrapper's prefix (`module.`, `base_model.model.`). Each call is all or nothing,
    like `refit_module_weights(..., in_place=True)`.

    `strict=False` binds only the weights given (a trainer's trainable ones): each call
    refits those, and the derived constants they feed (recomputed from them and the sources
    the engine keeps; refused by name at binding when the engine keeps none). A peft model
    given for an engine of its base model is merged: each call computes `W + scale * B @ A`
    for the adapters in effect, from the current base weights, factors and scales, on the
    engines' device, and refits the adapted layers only (the others are the frozen base).

    `check_finite` (default: the module's `Settings.check_finite`) refuses NaN, and inf
    where the compiled constant held none, before anything is served: a plain module
    checks the new values on the device before its copy (the copy is gated by the check),
    a double-buffered one as it copies into its standby bank. False copies without looking.
    """

    def __init__(
        self,
        compiled: CompiledModule,
        weights: Any,
        *,
        cuda_graph: bool = True,
        check_finite: bool | None = None,
        name_map: NameMap | None = None,
        strict: bool = True,
    ) -> None:
        self.module = compiled
        self.state = refittable(compiled)
        self.check_finite = (
            self.state.settings.check_finite if check_finite is None else bool(check_finite)
        )
        if isinstance(weights, (str, os.PathLike)):
            raise TorchRefitError(
                "A Refitter binds tensors that change in place; a file is read once. Refit from "
                "a file with torchrefit.refit_module_weights(module, path, in_place=True)."
            )
        specs, device = self.state.specs, self.state.store.device
        self._merge: LoraMerge | None = peft_merge(weights, specs, name_map, device)
        if self._merge is not None:  # bind the merged weights; watch the peft model's own
            self._merge()
            new = read(self._merge.outputs, specs, strict=False)
            self._binding = Binding(weights, self._merge.bound, None)
        else:
            new = read(weights, specs, name_map, strict=strict)
        self.matched: Matched = fast(new, self.state)
        self.tensors = _tensors(self.matched)
        if self._merge is None:
            self._binding = Binding(weights, self.tensors, name_map)
        elif cuda_graph and self._merge.capturable():
            self._merge.capture()
        self._graphs: _Graphs | None = None
        self._host: _Host | None = None
        if cuda_graph and self._capturable():
            self._graphs = _Graphs.capture(self)
        if self._graphs is None:
            self._host = _Host.plan(self)

    def __call__(self) -> None:
        self._binding.check()
        merge = self._merge
        if merge is not None:
            merge.check()
        with self.state.guard.refit:
            if merge is not None:
                merge()  # the merged weights, into the memory bound below
            if self._graphs is not None:
                self._graphs.run()
                return
            if self._host is not None:
                commit_by(self.module, self._host.keys, self._host.writer)
                return
            values = evaluate(self.matched, self.state)
            check_layout(values, self.state)
            commit(self.module, values, in_place=True, check=self.check_finite)

    def _capturable(self) -> bool:
        device = self.state.store.device
        if device.type != "cuda":
            return False
        return all(
            t.device == device or (t.is_pinned() and t.is_contiguous())
            for t in self.tensors.values()
        )


# -- what is bound ---------------------------------------------------------------------------

# (id(module), attribute) -> the Bindings that hold what the module has there: torch's
# registration hooks call `_registered` before an assignment lands
_EXPECTED: dict[tuple[int, str], list[weakref.ref[Binding]]] = {}
_HOOKS: list[Any] = []


def _registered(module: torch.nn.Module, name: str, value: Any) -> None:
    for ref in list(_EXPECTED.get((id(module), name), ())):
        binding = ref()
        if binding is not None:
            binding.assigned(module, name, value)


def _watch_registrations() -> None:
    """torch's global registration hooks see every parameter, buffer or module assigned to
    any module (`m.w = Parameter(...)`, `load_state_dict(assign=True)`, `m.block = ...`)."""
    if _HOOKS:
        return
    hooks = torch.nn.modules.module
    _HOOKS.extend(
        [
            hooks.register_module_parameter_registration_hook(_registered),
            hooks.register_module_buffer_registration_hook(_registered),
            hooks.register_module_module_registration_hook(_registered),
        ]
    )


def _forget(keys: list[tuple[int, str]], ref: weakref.ref[Binding]) -> None:
    for key in keys:
        refs = _EXPECTED.get(key)
        if refs is not None and ref in refs:
            refs.remove(ref)
            if not refs:
                del _EXPECTED[key]


_SAME_POINTERS = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
_DATA_PTR = torch.Tensor.data_ptr


class Binding:
    """The caller's own tensor objects behind the bound aliases, and where a module holds
    them. `check()` is O(1) in Python: a flag that torch's registration hooks set when one
    of them (or a module above it) is assigned another object, and one C-level comparison
    of the objects' data pointers with the snapshot taken at binding."""

    def __init__(self, weights: Any, bound: dict[str, torch.Tensor], name_map: NameMap | None):
        _watch_registrations()
        self.owners = _owners(weights, bound, name_map)  # fqn -> (module, slot, attr, tensor)
        self.originals = _originals(weights, bound, self.owners, name_map)
        self.names = list(self.originals)
        self.objects = list(self.originals.values())
        self.snapshot = [(t.dtype, t.shape) for t in self.objects]
        self.pointers: list[int | None] = [t.data_ptr() for t in self.objects]
        self.indices = list(range(len(self.objects)))
        self.replaced: str | None = None  # what an assignment replaced
        # (id(module), attribute) -> (the module, the object it holds there, what it stands for)
        self.expected: dict[tuple[int, str], tuple[Any, Any, str]] = {}
        if isinstance(weights, torch.nn.Module):
            self._expect(weights)
        ref = weakref.ref(self)
        for key in self.expected:
            _EXPECTED.setdefault(key, []).append(ref)
        weakref.finalize(self, _forget, list(self.expected), ref)

    def _expect(self, root: torch.nn.Module) -> None:
        """Each bound weight's slot in its module, and each module's slot in its parent on
        the way up to `root`."""
        parents: dict[int, tuple[torch.nn.Module, str]] = {}
        for module in root.modules():
            for name, sub in module._modules.items():
                if sub is not None:
                    parents.setdefault(id(sub), (module, name))
        for fqn, (module, _, attr, tensor) in self.owners.items():
            self.expected[(id(module), attr)] = (weakref.ref(module), tensor, fqn)
            child: torch.nn.Module = module
            while id(child) in parents:
                parent, name = parents[id(child)]
                self.expected.setdefault((id(parent), name), (weakref.ref(parent), child, fqn))
                child = parent

    def assigned(self, module: torch.nn.Module, name: str, value: Any) -> None:
        found = self.expected.get((id(module), name))
        if found is not None and found[0]() is module and value is not found[1]:
            self.replaced = found[2]

    def check(self) -> None:
        if self.replaced is not None:
            raise TorchRefitError(
                f"Bound weight {self.replaced!r} was replaced by another tensor object since "
                "the Refitter was made (module.<name> = Parameter(...), load_state_dict(..., "
                "assign=True), or its module replaced); this Refitter would keep copying the "
                "old one. Make a new Refitter."
            )
        if _SAME_POINTERS is not None:
            same = _SAME_POINTERS(self.objects, self.pointers, self.indices)
        else:
            same = list(map(_DATA_PTR, self.objects)) == self.pointers
        if not same:
            self._explain()

    def _explain(self) -> None:
        """Name what changed: a dtype, a shape, or the memory (its .data was replaced)."""
        for fqn, tensor, (dtype, shape), ptr in zip(
            self.names, self.objects, self.snapshot, self.pointers, strict=True
        ):
            if tensor.dtype != dtype:
                raise WeightDtypeError(
                    f"Bound weight {fqn!r} is now {tensor.dtype}; it was {dtype} when the "
                    "Refitter was made. Make a new Refitter."
                )
            if tensor.shape != shape:
                raise WeightShapeError(
                    f"Bound weight {fqn!r} now has shape {list(tensor.shape)}; it had "
                    f"{list(shape)} when the Refitter was made. Make a new Refitter."
                )
            if tensor.data_ptr() != ptr:
                raise TorchRefitError(
                    f"Bound weight {fqn!r} now lives in other memory (its .data was replaced); "
                    "a Refitter binds tensors once. Make a new Refitter."
                )


def _owners(
    weights: Any, bound: dict[str, torch.Tensor], name_map: NameMap | None
) -> dict[str, tuple[torch.nn.Module, str, str, torch.Tensor]]:
    """For a module: each bound weight's owning module, dict (`_parameters`/`_buffers`),
    attribute name and object."""
    if not isinstance(weights, torch.nn.Module):
        return {}
    owners: dict[str, tuple[torch.nn.Module, str, str, torch.Tensor]] = {}
    for name, module in weights.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        for slot in ("_parameters", "_buffers"):
            for attr, tensor in getattr(module, slot).items():
                fqn = _mapped(prefix + attr, name_map)
                if fqn is not None and fqn in bound and tensor is not None:
                    owners.setdefault(fqn, (module, slot, attr, tensor))
    return owners


def _originals(
    weights: Any,
    bound: dict[str, torch.Tensor],
    owners: dict[str, tuple[torch.nn.Module, str, str, torch.Tensor]],
    name_map: NameMap | None,
) -> dict[str, torch.Tensor]:
    """The caller's tensor objects (a Parameter whose .data is swapped stays the same object,
    while the detached alias bound keeps the old memory)."""
    if isinstance(weights, torch.nn.Module):
        given = {fqn: entry[3] for fqn, entry in owners.items()}
        # a DTensor (FSDP2) is watched through the local tensor bound: its own pointer is 0
        given = {k: t for k, t in given.items() if not hasattr(t, "device_mesh")}
    else:
        given = {}
        for name, tensor in dict(weights).items():
            fqn = _mapped(name, name_map)
            if fqn is not None and isinstance(tensor, torch.Tensor):
                if not hasattr(tensor, "device_mesh"):
                    given.setdefault(fqn, tensor)
    return {k: given.get(k, t) for k, t in bound.items()}


def _mapped(name: str, name_map: NameMap | None) -> str | None:
    if name_map is None:
        return name
    if isinstance(name_map, dict):
        return name_map.get(name, name)
    return name_map(name)  # type: ignore[operator]


def _tensors(matched: Matched) -> dict[str, torch.Tensor]:
    """The bound tensors (a module's or a state_dict's: never file entries)."""
    tensors = {k: t for k, t in matched.tensors.items() if isinstance(t, torch.Tensor)}
    assert len(tensors) == len(matched.tensors)
    return tensors


# -- CPU engines ---------------------------------------------------------------------------


class _Host:
    """A CPU engine whose new values are the bound tensors themselves (no cast, no weight
    program): each call checks them with one norm launch per dtype and copies them with one
    `_foreach_copy_`, planned once, so its Python work does not grow with the weights."""

    @classmethod
    def plan(cls, refitter: Refitter) -> _Host | None:
        state, matched = refitter.state, refitter.matched
        if state.store.device.type != "cpu" or matched.weight_program.outputs:
            return None
        values = evaluate(matched, state)
        check_layout(values, state)
        bound = refitter.tensors
        if values.streamed or any(bound.get(k) is not v for k, v in values.tensors.items()):
            return None  # a cast, or a value the refit reads from elsewhere
        if any(v.dtype.itemsize == 1 and floating(v.dtype) for v in values.tensors.values()):
            return None  # float8: torch's norms read an upcast copy, made per call
        return cls(refitter, values)

    def __init__(self, refitter: Refitter, values: Values) -> None:
        self.refitter, self.values = refitter, values
        self.keys = set(values.tensors)
        self.sources = list(values.tensors.values())
        inf_ok = refitter.state.inf_allowed
        checked = {k: v for k, v in values.tensors.items() if floating(v.dtype) and v.numel()}
        self.strict = by_dtype([v for k, v in checked.items() if k not in inf_ok])
        self.loose = [v for k, v in checked.items() if k in inf_ok]  # inf allowed, NaN not
        self.targets: dict[int, list[torch.Tensor]] = {}

    def writer(self, store: WeightStore, live: bool) -> _HostWriter:
        targets = self.targets.get(id(store))
        if targets is None:
            targets = self.targets[id(store)] = [store[k] for k in self.values.tensors]
        return _HostWriter(self, targets)


class _HostWriter:
    def __init__(self, plan: _Host, targets: list[torch.Tensor]) -> None:
        self.plan, self.targets = plan, targets

    def stage(self) -> None:
        plan = self.plan
        if not plan.refitter.check_finite:
            return
        if not finite_groups(plan.strict) or any(bool(v.isnan().any()) for v in plan.loose):
            state = plan.refitter.state
            raise_nonfinite(plan.values.tensors, plan.values.sources, state)
            raise WeightValueError("A bound weight held NaN or inf while it was read.")

    def write(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.targets, self.plan.sources)

    def verdict(self) -> None:
        return


# -- CUDA graphs ---------------------------------------------------------------------------


class _Graphs:
    """The core's evaluate stage and its `Transfer` into each target bank, captured as one
    CUDA graph per bank over the bound tensors: the weight program, then (plain) the check
    and the copy gated by it, or (double-buffered) the copy flagged as it writes. The host
    replays one graph and reads one flag per call."""

    def __init__(self, refitter: Refitter, values: Values, compute: torch.cuda.CUDAGraph | None):
        self.refitter, self.values, self.compute = refitter, values, compute
        self.keys = set(values.keys())
        self.banks: dict[int, _Bank] = {}
        # the graphs read host memory: the caller may refill it once a call returns
        self.host_sources = any(not t.is_cuda for t in refitter.tensors.values())

    @classmethod
    def capture(cls, refitter: Refitter) -> _Graphs | None:
        """Warm the evaluate stage up outside a graph, then capture it when it computes
        anything (a weight program, a cast): its outputs stay in the graph's memory, the
        values each replay recomputes from the bound tensors. None where it cannot be
        captured: the Refitter then runs uncaptured."""
        state, matched = refitter.state, refitter.matched
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            values = evaluate(matched, state)  # warm up outside the graph
        torch.cuda.current_stream().wait_stream(side)
        bound = refitter.tensors
        compute = None
        if matched.weight_program.outputs or any(
            bound.get(k) is not v for k, v in values.tensors.items()
        ):
            compute = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(compute, capture_error_mode="thread_local"):
                    with torch.no_grad():
                        values = evaluate(matched, state)
            except Exception as exc:  # noqa: BLE001 - uncaptured costs speed, not correctness
                logger.warning("a refit's evaluate stage could not be captured (%s)", exc)
                return None
        check_layout(values, state)
        logger.info("refit of %d constants captured as CUDA graphs", len(values.tensors))
        return cls(refitter, values, compute)

    def run(self) -> None:
        commit_by(self.refitter.module, self.keys, self._bank)

    def _bank(self, store: WeightStore, live: bool) -> _Bank:
        bank = self.banks.get(id(store))
        if bank is None:
            bank = self.banks[id(store)] = _Bank(self, store, live)
        return bank


class _Bank:
    """The writer for one target bank: a Transfer of the captured values. Captured, one
    graph replays the check and the copy (under the write lock, for a live bank); until
    then (or where it cannot be), the Transfer runs its steps as any refit's do."""

    def __init__(self, graphs: _Graphs, store: WeightStore, live: bool) -> None:
        refitter = graphs.refitter
        self.graphs = graphs
        self.transfer = Transfer(
            refitter.state,
            store,
            graphs.values,
            check=refitter.check_finite,
            live=live,
            tables={},
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        if not self.transfer.capturable():
            logger.info("this refit cannot be captured (host copies); it runs uncaptured")

    def stage(self) -> None:
        self.transfer.reset()
        if self.graph is None:  # uncaptured: read and check outside the write lock
            self._compute()
            self._zero_flag()
            self.transfer.stage()

    def write(self) -> None:
        if self.graph is not None:
            self._compute()  # the weight program, into the values' memory
            self.graph.replay()
            return
        self.transfer.write()
        if self.transfer.capturable() and not self.failed:
            self.graph = _captured(self._replayed)
            self.failed = self.graph is None

    def _replayed(self) -> None:
        """What the captured graph does: the flag zeroed, the check, the copy."""
        self._zero_flag()
        self.transfer.stage()
        self.transfer.write()

    def _compute(self) -> None:
        if self.graphs.compute is not None:
            self.graphs.compute.replay()

    def _zero_flag(self) -> None:
        if self.transfer.flag is not None:
            self.transfer.flag.zero_()

    def verdict(self) -> None:
        self.transfer.verdict()
        if self.graphs.host_sources and not self.transfer.check:
            torch.cuda.current_stream().synchronize()  # the caller may refill its buffers


def _captured(run: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
    """`run` captured (thread_local: calls on other threads go on meanwhile), or None where
    it cannot be: the refit then runs uncaptured."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad():
            run()
    except Exception as exc:  # noqa: BLE001 - a failed capture costs speed, not correctness
        logger.warning(
            "a refit could not be captured as a CUDA graph (%s); it runs uncaptured", exc
        )
        return None
    return graph
