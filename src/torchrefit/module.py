"""The compiled module: an fx.GraphModule whose children are engines and fallbacks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .calls import CallSignature, bind, leaf_names, signature_of_layout, structure_error
from .concurrency import Guard
from .cuda_graphs import CudaGraphs
from .engine.base import Runner
from .errors import InputError, SerializationError, WeightsNotLoadedError
from .export import WeightSpec
from .lower.context import Lineage
from .settings import Settings
from .tables import parse_dtype
from .weights import WeightProgram, WeightStore

Signature = tuple[Any, ...]  # per activation: (dtype, shape, stride), or ("value", v)


@dataclass
class Variant:
    """An engine compiled again for one exact signature of its activations."""

    runner: Runner
    artifact: bytes | None = None  # the runner's bytes, once dumped


class Engine(torch.nn.Module):
    """One compiled partition. Its constants are tensors of the weight store, read in place.

    `variants` are the partition compiled for exact activation shapes (a decoder's one-token
    step): a call whose activations match one runs it, any other the general runner."""

    def __init__(
        self,
        backend: str,
        runner: Runner,
        constant_keys: list[str],
        single_output: bool,
        artifact: bytes | None = None,
        variants: dict[Signature, Variant] | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.runner = runner
        self.constant_keys = constant_keys
        self.single_output = single_output
        self.artifact = artifact  # the runner's bytes, once dumped
        self.variants: dict[Signature, Variant] = dict(variants or {})
        self._constants: list[torch.Tensor] = []
        # the partition's graph, to compile variants from: set by build, dropped when the
        # compile ends (a loaded engine has the variants its file holds); outside
        # __setattr__, so not a child module
        self.__dict__["source"] = None

    def bind(self, store: WeightStore) -> None:
        self._constants = [store[k] for k in self.constant_keys]

    def constants(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.constant_keys, self._constants, strict=True))

    def forward(self, *activations: Any) -> Any:
        runner = self.runner
        if self.variants:
            variant = self.variants.get(signature(activations))
            if variant is not None:
                runner = variant.runner
        outputs = runner(*self._constants, *activations)
        return outputs[0] if self.single_output else tuple(outputs)

    def extra_repr(self) -> str:
        variants = f", variants={len(self.variants)}" if self.variants else ""
        return f"backend={self.backend}, constants={len(self.constant_keys)}{variants}"


def signature(activations: tuple[Any, ...] | list[Any]) -> Signature:
    """What a variant is compiled for: each tensor's dtype, shape and strides, each other
    input's value. Computed on every call of an engine that has variants (microseconds)."""
    return tuple(
        (x.dtype, tuple(x.shape), _strides(x)) if isinstance(x, torch.Tensor) else ("value", x)
        for x in activations
    )


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of dimensions of more than one element: a size-1 dimension's stride is never
    used to address (and compiled engines do not check it)."""
    return tuple(s if n > 1 else 0 for n, s in zip(x.shape, x.stride(), strict=True))


class Fallback(fx.GraphModule):
    """A partition PyTorch runs op by op; its weights are buffers bound to the weight store."""

    constant_keys: list[str]

    def bind(self, store: WeightStore) -> None:
        for i, key in enumerate(self.constant_keys):
            self._buffers[f"_w{i}"] = store[key]


def make_fallback(graph: fx.Graph, constant_keys: list[str]) -> Fallback:
    module = torch.nn.Module()
    for i in range(len(constant_keys)):
        module.register_buffer(f"_w{i}", torch.empty(0), persistent=False)
    fallback = Fallback(module, graph)
    fallback.constant_keys = constant_keys
    return fallback


@dataclass(frozen=True)
class DynamicDim:
    """A dimension exported with torch.export.Dim: the sizes it accepts, the example's size,
    and its symbol (dimensions of one symbol must be equal)."""

    symbol: str | None  # "d0", numbered by first appearance; None for an expression of symbols
    min: int
    max: int | None  # None: unbounded
    example: int

    def to_json(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "min": self.min, "max": self.max, "example": self.example}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DynamicDim:
        bound = data["max"]
        return cls(
            data["symbol"],
            int(data["min"]),
            None if bound is None else int(bound),
            int(data["example"]),
        )

    def accepts(self, size: int) -> bool:
        return self.min <= size and (self.max is None or size <= self.max)

    def range_text(self) -> str:
        return f"{self.min} to {self.max}" if self.max is not None else f"{self.min} or more"


@dataclass
class InputGuard:
    """What one flat input must be: a tensor like the example (None for a dynamic
    dimension), or, for a non-tensor input, the very value the program was specialized on."""

    dtype: torch.dtype | None
    device: torch.device | None
    shape: tuple[int | None, ...] | None
    value: Any = None
    contiguous: bool = True  # the example was: other layouts are made contiguous
    dynamic: dict[int, DynamicDim] = field(default_factory=dict)  # dimension -> its range

    def to_json(self) -> list[Any]:
        if self.dtype is None:
            return ["value", self.value]
        return [
            str(self.dtype).removeprefix("torch."),
            str(self.device),
            list(self.shape or ()),
            self.contiguous,
            {str(d): dim.to_json() for d, dim in self.dynamic.items()},
        ]

    @classmethod
    def from_json(cls, data: list[Any]) -> InputGuard:
        if data[0] == "value":
            return cls(None, None, None, data[1])
        contiguous = data[3] if len(data) > 3 else True
        dynamic = {
            int(d): DynamicDim.from_json(v) for d, v in (data[4] if len(data) > 4 else {}).items()
        }
        return cls(
            parse_dtype(data[0]),
            torch.device(data[1]),
            tuple(data[2]),
            contiguous=contiguous,
            dynamic=dynamic,
        )

    def example_size(self) -> list[int]:
        """The example's shape: each dynamic dimension at its example size."""
        return [self.dynamic[d].example if e is None else e for d, e in enumerate(self.shape or ())]


@dataclass
class RefitState:
    """What a refit needs, recorded at compile time."""

    settings: Settings
    fingerprint: str  # of the source program, names included
    structure: list[str]  # the source program's node descriptors, for explanations
    lowered_structure: str  # fingerprint of the lowered graph without names (slow path)
    specs: dict[str, WeightSpec]  # source FQN -> spec, in signature order
    aliases: dict[str, str]  # tied name -> FQN
    engine_dtypes: dict[str, torch.dtype]  # source FQN -> dtype the engines' program holds
    weight_program: WeightProgram
    lineage: dict[str, Lineage]  # store key -> lineage
    store: WeightStore
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    guards: list[InputGuard]
    lowered_order: list[str] = field(default_factory=list)  # source FQNs by lowered position
    cast_inputs_to: torch.dtype | None = None
    unset: set[str] = field(default_factory=set)  # constants a stripped file did not hold
    output_constants: dict[str, str] = field(default_factory=dict)  # graph attribute -> key
    inf_allowed: set[str] = field(default_factory=set)  # constants that held inf when compiled
    guard: Guard = field(default_factory=Guard)  # calls against commits; refits one at a time
    standby: WeightStore | None = None  # double_buffer: the bank refits write into, then flip to
    stale: set[str] = field(default_factory=set)  # standby constants behind the active ones
    mutations: list[tuple[str, str]] = field(default_factory=list)  # state writes (first outputs)
    signature: CallSignature | None = None  # forward's, to bind calls; None: the layout's own
    lm: LMInfo | None = None  # a decoder compiled by compile_lm: its cache and limits

    def call_signature(self) -> CallSignature:
        """How calls bind: the forward's signature, or (a file from before it was recorded)
        the compiled layout's positions and keywords."""
        return self.signature or signature_of_layout(self.in_spec, None)

    def input_names(self) -> list[str]:
        """A name per flat input (`input_ids`, `inputs['mask']`), for errors; cached."""
        cached = self.__dict__.get("_input_names")
        if cached is None or cached[0] is not self.signature:
            names = leaf_names(self.call_signature(), self.in_spec)
            cached = self.__dict__["_input_names"] = (self.signature, names)
        return cached[1]


@dataclass(frozen=True)
class LMInfo:
    """What a decoder step compiled by `compile_lm` needs beyond the program: the limits of
    its static KV cache (store keys of the state buffers) and the model's token defaults."""

    max_batch_size: int
    max_seq_len: int
    cache_keys: tuple[str, ...]
    vocab_size: int
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LMInfo:
        return cls(
            int(data["max_batch_size"]),
            int(data["max_seq_len"]),
            tuple(str(k) for k in data["cache_keys"]),
            int(data["vocab_size"]),
            tuple(int(t) for t in data.get("eos_token_id", ())),
            None if data.get("pad_token_id") is None else int(data["pad_token_id"]),
        )


class CompiledModule(fx.GraphModule):
    """Takes the model's inputs, returns its output structure; refit with refit_module_weights.

    `copy.deepcopy` (and `copy.copy`) gives a module with weights, refit state and lock of its
    own that shares the compiled engines. It is not pickled (`torch.save`): its engines are
    compiled code; `torchrefit.save` writes it. Its `state_dict()` and `load_state_dict()`
    raise, naming what to call: the engines hold constants derived from the model's weights,
    and a refit (`torchrefit.refit_module_weights`) is what loads weights into them."""

    _torchrefit: RefitState

    def __init__(
        self, root: torch.nn.Module, graph: fx.Graph, class_name: str | None = None
    ) -> None:
        # torch.fx makes a class per instance, named by `class_name`: show the public one
        super().__init__(root, graph, class_name or public_class(self).__name__)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledModule:
        """A copy with its own weights (each constant copied once, from one complete weight
        set), its own refit state and lock; the compiled engines are shared."""
        state = self._torchrefit
        with state.guard.reading(state.store.device):  # the weights and what is unset, agreed
            copied = clone_module(self, WeightStore(state.store.tensors))
        memo[id(self)] = copied
        return copied

    def __copy__(self) -> CompiledModule:
        """As `copy.deepcopy`: two modules never share a weight store under two locks."""
        return self.__deepcopy__({})

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise SerializationError(
            f"A {type(self).__name__} cannot be pickled (torch.save, pickle, multiprocessing): "
            "its engines are compiled code, and pickles run code when loaded. Save it with "
            "torchrefit.save(compiled, path) and load it with torchrefit.load(path); copy it "
            "in memory with copy.deepcopy(compiled)."
        )

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(None)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise SerializationError(
            f"{type(self).__name__}.state_dict() is not the model's: the engines hold "
            "constants derived from its weights (casts, folded batch norms, quantized "
            "weights). Save the module with torchrefit.save(compiled, path) (its weights go "
            "into the file as safetensors), or keep the model's own state_dict; "
            "compiled.weight_map() tells how each constant is computed."
        )

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise SerializationError(
            f"{type(self).__name__}.load_state_dict(...) is a refit: call "
            "torchrefit.refit_module_weights(compiled, state_dict, in_place=True) (checked, "
            "all or nothing; strict=False refits only the weights given)."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(args, kwargs, self._torchrefit.settings.cuda_graphs)

    def run_program(self, *args: Any, **kwargs: Any) -> Any:
        """A call in the compiled program's own inputs: the same as calling the module,
        except for a CompiledLM, whose calls take token ids and this takes its step's."""
        return CompiledModule.__call__(self, *args, **kwargs)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any], graphs: bool) -> Any:
        """One call; `graphs`: replay it as a CUDA graph (captured once per input shape)."""
        state = self._torchrefit
        given = _flatten(args, kwargs, state)
        names = state.input_names()
        flat = [
            _guard(name, x, g, state.cast_inputs_to)
            for name, x, g in zip(names, given, state.guards, strict=True)
        ]
        _check_equal_dims(flat, state.guards, names)
        guard = state.guard
        guard.begin_read(state.store.device)  # one complete weight set per call
        try:
            if state.unset:  # read under the lock: a failed write marks it before releasing
                raise _not_loaded(state.unset)
            store = state.store
            if graphs and _all_cuda(flat):  # outputs are the graph's copies: never a constant
                outputs = _apply_mutations(
                    self._graphs(store).run(flat), state.mutations, store, given
                )
            else:
                outputs = _apply_mutations(
                    list(super().__call__(*flat)), state.mutations, store, given
                )
                outputs = [_owned(y, store) for y in outputs]
        finally:
            guard.end_read()
        return pytree.tree_unflatten(outputs, state.out_spec)

    def _graphs(self, store: WeightStore) -> CudaGraphs:
        """The CUDA graphs that read `store` (a double-buffered module has one set per bank)."""
        banks = self.__dict__.setdefault("_cuda_graphs", {})
        graphs = banks.get(id(store))
        if graphs is None:
            graphs = banks[id(store)] = CudaGraphs(
                lambda *xs: super(CompiledModule, self).__call__(*xs)
            )
        return graphs

    def engines(self) -> dict[str, Engine]:
        return {n: m for n, m in self.named_children() if isinstance(m, Engine)}

    def fallbacks(self) -> dict[str, Fallback]:
        return {n: m for n, m in self.named_children() if isinstance(m, Fallback)}

    def bind(self, store: WeightStore) -> None:
        self._torchrefit.store = store
        for child in self.children():
            if isinstance(child, (Engine, Fallback)):
                child.bind(store)
        for attr, key in self._torchrefit.output_constants.items():
            self._buffers[attr] = store[key]

    @property
    def settings(self) -> Settings:
        return self._torchrefit.settings

    def weight_map(self) -> dict[str, Lineage]:
        """Every constant the engines and fallbacks hold, and how it is computed."""
        return dict(self._torchrefit.lineage)


def _not_loaded(unset: set[str]) -> WeightsNotLoadedError:
    return WeightsNotLoadedError(
        f"This module holds {len(unset)} constants that no refit has supplied (e.g. "
        f"{sorted(unset)[0]!r}): it was loaded without its weights, or a refit failed while "
        "writing them. It would compute garbage. Supply them: torchrefit.load(path, "
        "weights=...) or refit_module_weights(module, weights, in_place=True)."
    )


def clone_module(module: CompiledModule, store: WeightStore) -> CompiledModule:
    """A new module sharing the engines' compiled code, bound to `store`."""
    root = torch.nn.Module()
    for attr in module._torchrefit.output_constants:
        root.register_buffer(attr, torch.empty(0), persistent=False)
    for name, child in module.named_children():
        copy: Engine | Fallback
        if isinstance(child, Engine):
            copy = Engine(
                child.backend,
                child.runner,
                child.constant_keys,
                child.single_output,
                child.artifact,
                child.variants,
            )
        else:
            assert isinstance(child, Fallback)
            copy = make_fallback(_copy_graph(child.graph), child.constant_keys)
        root.add_module(name, copy)
    # a CompiledLM stays one (GraphModule makes a class per instance: take what it derives from)
    compiled = public_class(module)(root, _copy_graph(module.graph))
    # its own refit state: what one module's refits mark (unset weights) never shows in another
    compiled._torchrefit = dataclasses.replace(
        module._torchrefit,
        store=store,
        unset=set(module._torchrefit.unset),
        guard=Guard(),
        standby=None,
        stale=set(),
    )
    compiled.bind(store)
    return compiled


def public_class(module: CompiledModule) -> type[CompiledModule]:
    """The class a compiled module was made as (CompiledModule, CompiledLM): torch.fx
    derives a class per instance from it."""
    return next(c for c in type(module).__mro__ if "GraphModuleImpl" not in c.__qualname__)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    output = new.graph_copy(graph, {})
    new.output(output)
    return new


def _apply_mutations(
    outputs: list[Any], mutations: list[tuple[str, str]], store: WeightStore, given: list[Any]
) -> list[Any]:
    """Write the forward's state updates where eager PyTorch would: into the module's state
    buffers (pointer-stable, in the store) and into the caller's input tensors. Returns the
    user outputs."""
    if not mutations:
        return outputs
    with torch.no_grad():
        for (kind, target), value in zip(mutations, outputs, strict=False):
            (store[target] if kind == "buffer" else given[int(target)]).copy_(value)
    return outputs[len(mutations) :]


def _all_cuda(flat: list[Any]) -> bool:
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(x.is_cuda for x in tensors)


def _flatten(args: tuple[Any, ...], kwargs: dict[str, Any], state: RefitState) -> list[Any]:
    """The flat inputs of a call bound as the forward binds it (a keyword for a positional
    example, a default left out), refusing a call the compiled layout cannot take."""
    layout = state.__dict__.get("_flat_layout")
    if layout is None:
        layout = state.__dict__["_flat_layout"] = _flat_layout(state.in_spec)
    if (
        layout
        and len(args) == layout[0]
        and len(kwargs) == len(layout[1])
        and all(isinstance(a, torch.Tensor) for a in args)
    ):  # the compiled layout itself, tensors only: nothing to bind (the per-call fast path)
        try:
            values = [kwargs[k] for k in layout[1]]
        except KeyError:
            values = None
        if values is not None and all(isinstance(v, torch.Tensor) for v in values):
            return [*args, *values]
    signature = state.call_signature()
    args, kwargs = bind(signature, state.in_spec, args, kwargs)
    flat, spec = pytree.tree_flatten((args, kwargs))
    if spec != state.in_spec:
        raise structure_error(signature, state.in_spec, args, kwargs)
    return flat


def _flat_layout(spec: pytree.TreeSpec) -> tuple[int, tuple[str, ...]] | tuple[()]:
    """(positional count, keyword names) when the compiled inputs are flat (each argument
    one tensor or value), else (): calls of that layout skip binding."""
    try:
        positional, keywords = _children(spec)
    except ValueError:
        return ()
    if not all(c.is_leaf() for c in [*_children(positional), *_children(keywords)]):
        return ()
    if positional.type is not tuple or keywords.type is not dict:
        return ()
    return positional.num_children, tuple(keywords.context or ())


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    children = getattr(spec, "children", None)  # torch >= 2.12; children_specs before
    return list(children() if callable(children) else spec.children_specs)


def _guard(name: str, x: Any, guard: InputGuard | None, cast_to: torch.dtype | None) -> Any:
    if guard is None:
        return x
    if guard.dtype is None:
        if isinstance(x, torch.Tensor) or (x is not guard.value and x != guard.value):
            raise InputError(
                f"Argument {name!r} is {_shown(x)}; the program was compiled for the value "
                f"{guard.value!r}, which it specialized on. Compile again for another value."
            )
        return x
    if not isinstance(x, torch.Tensor):
        left_out = " (left out, it takes its default)" if x is None else ""
        raise InputError(
            f"Argument {name!r} is {_shown(x)}{left_out}; the compiled module expects a tensor "
            f"of {_expected(guard)}: pass one."
        )
    if x.dtype != guard.dtype:
        if cast_to is not None and x.is_floating_point() and guard.dtype == cast_to:
            x = x.to(cast_to)
        else:
            raise InputError(
                f"Argument {name!r} has dtype {x.dtype}; the compiled module expects "
                f"{guard.dtype}. Pass {name}.to({guard.dtype})."
            )
    if x.device != guard.device:
        raise InputError(
            f"Argument {name!r} is on {x.device}; the compiled module runs on {guard.device}. "
            f"Pass {name}.to('{guard.device}')."
        )
    _check_shape(name, x, guard)
    return x.contiguous() if guard.contiguous else x


def _check_shape(name: str, x: torch.Tensor, guard: InputGuard) -> None:
    shape = guard.shape or ()
    if x.dim() != len(shape) or any(
        e is not None and e != d for e, d in zip(shape, x.shape, strict=True)
    ):
        raise InputError(
            f"Argument {name!r} has shape {list(x.shape)}; the compiled module expects "
            f"{_expected(guard)}. Export with torch.export.Dim for other sizes."
        )
    for d, dim in guard.dynamic.items():
        if not dim.accepts(x.shape[d]):
            raise InputError(
                f"Argument {name!r} has size {x.shape[d]} in dimension {d}; the compiled module "
                f"accepts {dim.range_text()} there (the range of its torch.export.Dim). "
                "Export with a Dim whose range holds this size."
            )


def _check_equal_dims(flat: list[Any], guards: list[InputGuard], names: list[str]) -> None:
    """Dimensions exported with one Dim must agree, as the engines assume."""
    if not any(g.dynamic for g in guards if g is not None):
        return
    seen: dict[str, tuple[int, str, int]] = {}
    for x, guard, name in zip(flat, guards, names, strict=True):
        for d, dim in guard.dynamic.items():
            if dim.symbol is None:
                continue
            first = seen.setdefault(dim.symbol, (x.shape[d], name, d))
            if first[0] != x.shape[d]:
                raise InputError(
                    f"Argument {name!r} has size {x.shape[d]} in dimension {d}, and argument "
                    f"{first[1]!r} size {first[0]} in dimension {first[2]}; the module was "
                    "exported with one torch.export.Dim for both, so they must be equal."
                )


def _expected(guard: InputGuard) -> str:
    """`float32[1..64, 128]`: a dynamic dimension as its range."""
    dims = []
    for d, e in enumerate(guard.shape or ()):
        dim = guard.dynamic.get(d)
        if e is not None:
            dims.append(str(e))
        else:
            dims.append("*" if dim is None else f"{dim.min}..{'' if dim.max is None else dim.max}")
    return f"{str(guard.dtype).removeprefix('torch.')}[{', '.join(dims)}]"


def _shown(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor {str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
    return (
        f"{x!r}" if isinstance(x, (bool, int, float, str, type(None))) else f"a {type(x).__name__}"
    )


def _owned(value: Any, store: WeightStore) -> Any:
    """An output that is a view of an engine constant is copied: callers never hold, or
    write into, the engines' weights."""
    if isinstance(value, torch.Tensor) and store.holds(value):
        return value.clone()
    return value
