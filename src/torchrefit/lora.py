"""peft LoRA layers under a compiled graph: merges and scales as weight changes, not structure.

peft's merge adds each adapter's delta to the base weight (through `.data`) and then skips
the adapter branches in forward; a scale (`scaling[adapter]`, which diffusers' `set_adapters`
and `fuse_lora(lora_scale=...)` set) is a Python float the trace bakes into the graph. A
compiled graph keeps the branches and scales it was traced with, so the weights it is given
are the current ones moved to the traced state:

    base weight  W - delta(merged now) + delta(merged when traced)
    lora_B       B * scale now / scale when traced        (vanilla Linear/Conv branches)

The outputs equal eager's as long as the adapters in effect (the merged ones, else the
active ones, none when disabled) are those in effect when traced; `LoraTrace.difference`
checks that, so merging, unmerging and rescaling are refits.

`LoraMerge` is the other direction: an engine compiled from the *base* model, refitted from a
peft model as peft would merge it (`W + scale * B @ A` per adapter in effect), for the
adapted layers only (`Refitter(compiled_base, peft_model)`, `refit_module_weights`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from .errors import IncompatibleWeightsError, TorchRefitError

Layer = Any  # a peft LoRA layer, duck-typed (`is_lora`)
_LINEAR_B = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@dataclass(frozen=True)
class LoraTrace:
    """Per LoRA layer path, its state when traced."""

    merged: dict[str, tuple[str, ...]]
    effective: dict[str, frozenset[str]]
    scaling: dict[str, dict[str, float]]  # only layers whose scales are refitted

    def handled(self) -> dict[str, set[str]]:
        """The attributes these layers' forward reads that are weights here, not keys."""
        handled = {path: {"merged_adapters"} for path in self.merged}
        for path in self.scaling:
            handled[path].add("scaling")
        return handled

    def difference(self, modules: Mapping[str, torch.nn.Module]) -> str | None:
        """Why the traced graph cannot stand for the layers now (None when it can)."""
        for path, effective in self.effective.items():
            module: Layer = modules.get(path)
            if module is None or not is_lora(module):
                return f"LoRA layer {path!r} is gone"
            if _effective(module) != effective:
                return f"the adapters in effect in {path!r} changed"
            needed = set(self.merged[path]) | set(_merged(module)) | set(self.scaling.get(path, ()))
            if not needed <= _adapters(module):
                return f"an adapter of {path!r} was deleted"
            scaling = getattr(module, "scaling", {})
            if any(not _number(scaling.get(a)) for a in self.scaling.get(path, ())):
                return f"a scale of {path!r} is no longer a number"
        return None


def is_lora(module: torch.nn.Module) -> bool:
    return (
        hasattr(module, "get_delta_weight")
        and hasattr(module, "base_layer")
        and hasattr(module, "merged_adapters")
    )


def lora_trace(model: torch.nn.Module) -> LoraTrace:
    """The LoRA layers of `model` as they are now, before a trace."""
    merged, effective, scaling = {}, {}, {}
    for path, module in model.named_modules():
        if not is_lora(module):
            continue
        merged[path] = _merged(module)
        effective[path] = _effective(module)
        if _scales_refit(module):
            scaling[path] = {a: float(s) for a, s in module.scaling.items()}
    return LoraTrace(merged, effective, scaling)


def lora_views(modules: Mapping[str, torch.nn.Module], trace: LoraTrace) -> dict[str, torch.Tensor]:
    """FQN -> the weight the traced graph needs, for weights that differ from the model's
    (`modules`: path -> module); each carries `_torchrefit_view`, so its value is compared
    on every call."""
    views: dict[str, torch.Tensor] = {}
    for path, then in trace.merged.items():
        module: Layer = modules.get(path)
        if module is None or not is_lora(module):
            continue
        prefix = f"{path}." if path else ""
        now = _merged(module)
        if now != then:
            views.update(_base_views(module, prefix, now, then))
        for adapter, traced in trace.scaling.get(path, {}).items():
            current = module.scaling[adapter]
            if current != traced:
                views.update(_scaled_views(module, prefix, adapter, current / traced))
    for view in views.values():
        view._torchrefit_view = True  # type: ignore[attr-defined]
    return views


def _base_views(
    module: Layer, prefix: str, now: tuple[str, ...], then: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    views = {}
    with torch.no_grad():
        weight = module.base_layer.weight.detach().clone()
        for adapter, sign in [(a, -1.0) for a in now] + [(a, 1.0) for a in then]:
            weight.add_(module.get_delta_weight(adapter).to(weight.dtype), alpha=sign)
        views[f"{prefix}base_layer.weight"] = weight
        bias = getattr(module.base_layer, "bias", None)
        deltas = [(a, -1.0) for a in now if _b_bias(module, a) is not None]
        deltas += [(a, 1.0) for a in then if _b_bias(module, a) is not None]
        if bias is not None and deltas:  # peft's lora_bias: merging adds B's bias too
            bias = bias.detach().clone()
            for adapter, sign in deltas:
                delta = _b_bias(module, adapter) * module.scaling[adapter]
                bias.add_(delta.to(bias.dtype), alpha=sign)
            views[f"{prefix}base_layer.bias"] = bias
    return views


def _scaled_views(
    module: Layer, prefix: str, adapter: str, ratio: float
) -> dict[str, torch.Tensor]:
    branch = module.lora_B[adapter]
    views = {}
    with torch.no_grad():
        for name, tensor in (("weight", branch.weight), ("bias", branch.bias)):
            if tensor is not None:
                views[f"{prefix}lora_B.{adapter}.{name}"] = tensor.detach() * ratio
    return views


def _b_bias(module: Layer, adapter: str) -> torch.Tensor | None:
    branches = getattr(module, "lora_B", None)
    if not isinstance(branches, torch.nn.ModuleDict) or adapter not in branches:
        return None
    return getattr(branches[adapter], "bias", None)


def _merged(module: Layer) -> tuple[str, ...]:
    return tuple(module.merged_adapters)


def _effective(module: Layer) -> frozenset[str]:
    """The adapters whose deltas the layer's output holds: none when disabled, the merged
    ones when any is merged (forward then skips every branch), else the active ones."""
    if getattr(module, "disable_adapters", False):
        return frozenset()
    if module.merged_adapters:
        return frozenset(module.merged_adapters)
    active = getattr(module, "active_adapters", ())
    return frozenset(a for a in active if a in _adapters(module))


def _adapters(module: Layer) -> set[str]:
    names: set[str] = set()
    for group in ("lora_A", "lora_embedding_A"):
        container = getattr(module, group, None)
        if isinstance(container, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
            names.update(container.keys())
    return names


def _scales_refit(module: Layer) -> bool:
    """Whether every adapter's scale enters forward only as `lora_B(...) * scale` with a
    Linear or Conv `lora_B` (vanilla LoRA: no DoRA or other variant), and is a nonzero
    number to divide by."""
    scaling = getattr(module, "scaling", None)
    branches = getattr(module, "lora_B", None)
    if not isinstance(scaling, dict) or not isinstance(branches, torch.nn.ModuleDict):
        return False
    variants = getattr(module, "lora_variant", {}) or {}
    dora = getattr(module, "use_dora", {}) or {}
    return all(
        _number(scale)
        and scale != 0
        and adapter in branches
        and isinstance(branches[adapter], _LINEAR_B)
        and adapter not in variants
        and not dora.get(adapter, False)
        for adapter, scale in scaling.items()
    )


def _number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


# -- a base-model engine refitted from a peft model -------------------------------------------

NameMapping = Union[Mapping[str, str], Callable[[str], "str | None"]]  # noqa: UP007
_STATE_ATTRS = ("_active_adapter", "merged_adapters", "_disable_adapters")
_STATE = operator.attrgetter(*_STATE_ATTRS)


def merge_of(
    model: Any,
    dtype_of: Callable[[str], torch.dtype | None],
    name_map: NameMapping | None,
    device: torch.device,
) -> LoraMerge | None:
    """The merge plan of a peft model for an engine of its base model, or None when `model`
    is not one: no LoRA layer, or the engine holds the LoRA layers themselves (compiled from
    the peft model). `dtype_of`: a compiled weight's dtype by FQN (None: no such weight);
    `name_map` renames the base model's names (`X.weight`) to the engine's."""
    if not isinstance(model, torch.nn.Module):
        return None
    root, prefix = _peft_root(model)
    layers = {path: m for path, m in root.named_modules() if is_lora(m)}
    if not any(dtype_of(_renamed(_join(p, "weight"), name_map) or "") for p in layers):
        return None
    _refuse_others(root, layers)
    names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    plan = LoraMerge(device)
    for path, layer in layers.items():
        fqn = _renamed(_join(path, "weight"), name_map)
        dtype = dtype_of(fqn) if fqn is not None else None
        if fqn is None or dtype is None:
            raise IncompatibleWeightsError(
                f"The peft model adapts {prefix + path!r}, whose weight {fqn or path!r} the "
                "compiled model does not hold. Compile the base model this peft model wraps "
                "(peft_model.get_base_model() with its adapters unloaded), or map its names "
                "with name_map=."
            )
        plan.add(prefix + path, layer, fqn, dtype, names)
    plan.build()
    return plan


def _peft_root(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The base model inside a PeftModel (`base_model.model`) or a LoraModel (`model`), and
    its names' prefix; a model with LoRA layers injected is its own root."""
    tuner: Any = getattr(model, "base_model", None)
    if _is_tuner(tuner) and hasattr(model, "peft_config"):
        return tuner.model, "base_model.model."
    if _is_tuner(model):
        inner: torch.nn.Module = getattr(model, "model")  # noqa: B009 - typed as a module
        return inner, "model."
    return model, ""  # LoRA layers injected (inject_adapter_in_model, transformers' load_adapter)


def _is_tuner(module: Any) -> bool:
    """A peft tuner (LoraModel): it injects adapters into the model it wraps."""
    return (
        isinstance(module, torch.nn.Module)
        and hasattr(module, "inject_adapter")
        and isinstance(getattr(module, "model", None), torch.nn.Module)
    )


def _refuse_others(root: torch.nn.Module, layers: Mapping[str, torch.nn.Module]) -> None:
    """peft layers the merge does not compute (other tuners, modules_to_save, DoRA, LoRA of
    a convolution, lora_bias) are refused by name: never merged wrongly or left stale."""
    for path, module in root.named_modules():
        what = None
        if path in layers:
            what = _unmergeable(module)
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            what = "a modules_to_save copy (a trained full module)"
        elif hasattr(module, "base_layer") and hasattr(module, "merged_adapters"):
            what = f"a peft {type(module).__name__} layer, not LoRA"
        if what is not None:
            raise TorchRefitError(
                f"peft layer {path!r} is {what}, which a base-model engine is not refitted from "
                "(merged LoRA of Linear, Conv1D and Embedding layers only). Compile the peft "
                "model itself (torchrefit.MutableModule(peft_model)), or merge it and refit "
                "from peft_model.merge_and_unload()."
            )


def _unmergeable(layer: Layer) -> str | None:
    adapters = _adapters(layer)
    if getattr(layer, "lora_variant", None) or any(getattr(layer, "use_dora", {}).values()):
        return "DoRA or another LoRA variant"
    if any(getattr(layer, "lora_bias", {}).get(a, False) for a in adapters):
        return "LoRA with lora_bias"
    linear = getattr(layer, "lora_A", {})
    if any(not isinstance(linear[a], torch.nn.Linear) for a in linear if a in adapters):
        return "LoRA of a convolution"
    weight = getattr(layer.get_base_layer(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "LoRA of a layer without a 2-D weight"
    return None


@dataclass
class _Part:
    """One adapter's term of one layer: `sign * scaling[adapter] * B @ A`."""

    adapter: str
    a: torch.Tensor  # (r, in), as the product takes it
    b: torch.Tensor  # (out, r)
    sign: float


@dataclass
class _Group:
    """Layers merged by one batched product: the same weight shape, orientation, rank sum,
    weight dtype and product dtype (the base weight's and factors' promoted, so fp32
    factors of a bf16 model are not rounded first). `merged[l]` holds layer l's weight
    in the product dtype, `output[l]` in the weight's when it differs; `a`, `b` and `s` the
    stacked factors and each rank column's scale (sign included, float32)."""

    merged: torch.Tensor  # (L, *weight shape)
    a: torch.Tensor  # (L, R, in)
    b: torch.Tensor  # (L, out, R)
    s: torch.Tensor  # (L, 1, R)
    scaled: torch.Tensor  # b * s, recomputed per call
    transposed: bool  # the weight holds (B @ A).T: fan_in_fan_out Linear, Embedding
    output: torch.Tensor | None  # the merged weights in the weight's dtype, if not merged's

    def run(self) -> None:
        if self.a.shape[1]:  # else no adapter in effect: the base weight as it is
            torch.mul(self.b, self.s, out=self.scaled)
            if self.transposed:
                self.merged.baddbmm_(self.a.transpose(1, 2), self.scaled.transpose(1, 2))
            else:
                self.merged.baddbmm_(self.scaled, self.a)
        if self.output is not None:
            self.output.copy_(self.merged)


@dataclass
class _Layer:
    path: str
    fqn: str
    weight: torch.Tensor
    dtype: torch.dtype
    transposed: bool
    parts: list[_Part]
    module: Any


@dataclass
class LoraMerge:
    """Merged weights of a peft model's LoRA layers, computed on `device`, as peft merges
    them (`get_delta_weight`: `B @ A` times the adapter's scale, transposed for
    fan_in_fan_out and embeddings), for the adapters in effect (the active ones; the merged
    ones are already in the base weight; none while disabled). Each call reads the current
    A, B, base weight and scales: one copy of the bound tensors into stacked buffers, then
    one batched product per group of like layers, so the host work does not grow with the
    layer count. `outputs`: compiled FQN -> its merged weight (fixed memory); `bound`: the
    peft model's parameters read, by name."""

    device: torch.device
    layers: list[_Layer] = field(default_factory=list)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    bound: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: list[_Group] = field(default_factory=list)
    graph: Any = None  # a CUDA graph of the copies and products, once captured

    def add(
        self, path: str, layer: Layer, fqn: str, dtype: torch.dtype, names: dict[int, str]
    ) -> None:
        weight = layer.get_base_layer().weight
        merged, effective = set(_merged(layer)), _effective(layer)
        order = sorted(_adapters(layer))
        signs = [(a, 1.0) for a in order if a in effective - merged]
        signs += [(a, -1.0) for a in order if a in merged - effective]
        embedding = bool(getattr(layer, "lora_embedding_A", None)) and all(
            a in layer.lora_embedding_A for a, _ in signs
        )
        parts = [_Part(a, *self._factors(layer, a, embedding), sign) for a, sign in signs]
        transposed = embedding or bool(getattr(layer, "fan_in_fan_out", False))
        for part in parts:
            delta = (part.b.shape[0], part.a.shape[1])
            if (delta[::-1] if transposed else delta) != tuple(weight.shape):
                raise IncompatibleWeightsError(
                    f"peft layer {path!r}: adapter {part.adapter!r} gives a delta of "
                    f"{list(delta)} for a weight of {list(weight.shape)}."
                )
        for tensor in [weight, *(t for p in parts for t in (p.a, p.b))]:
            self.bound[names.get(id(tensor), f"{path}.?")] = tensor
        self.layers.append(_Layer(path, fqn, weight, dtype, transposed, parts, layer))

    @staticmethod
    def _factors(layer: Layer, adapter: str, embedding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if embedding:
            return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight

    def build(self) -> None:
        """Group like layers; allocate the stacked buffers; plan the copies and scales."""
        keyed: dict[tuple[Any, ...], list[_Layer]] = {}
        for layer in self.layers:
            ranks = tuple(p.a.shape[0] for p in layer.parts)
            product = layer.dtype
            for t in (layer.weight, *(t for p in layer.parts for t in (p.a, p.b))):
                product = torch.promote_types(product, t.dtype)
            shape = tuple(layer.weight.shape)
            key = (shape, layer.transposed, sum(ranks), layer.dtype, product)
            keyed.setdefault(key, []).append(layer)
        self._dst: list[torch.Tensor] = []
        self._src: list[torch.Tensor] = []
        self._scales: list[tuple[torch.Tensor, int, int, int, float]] = []  # s, row, columns, sign
        self._dicts: list[dict[str, Any]] = []
        self._names: list[str] = []
        for (shape, transposed, rank, dtype, product), layers in keyed.items():
            self.groups.append(self._group(layers, shape, transposed, rank, dtype, product))
        self._modules = [layer.module for layer in self.layers]
        self._state = [_snapshot(module) for module in self._modules]
        self._fast_state = all(hasattr(m, a) for m in self._modules for a in _STATE_ATTRS)
        self._current: list[Any] = []
        self._rescale(self._read_scales())

    def _group(
        self,
        layers: list[_Layer],
        shape: tuple[int, ...],
        transposed: bool,
        rank: int,
        dtype: torch.dtype,
        product: torch.dtype,
    ) -> _Group:
        out, inner = shape[::-1] if transposed else shape
        count = len(layers)

        def make(*size: int, kind: torch.dtype = product) -> torch.Tensor:
            return torch.empty(size, dtype=kind, device=self.device)

        group = _Group(
            make(count, *shape),
            make(count, rank, inner),
            make(count, out, rank),
            make(count, 1, rank, kind=torch.float32).zero_(),
            make(count, out, rank),
            transposed,
            make(count, *shape, kind=dtype) if dtype != product else None,
        )
        for row, layer in enumerate(layers):
            result = group.merged if group.output is None else group.output
            self.outputs[layer.fqn] = result[row]
            self._dst.append(group.merged[row])
            self._src.append(layer.weight)
            start = 0
            for part in layer.parts:
                end = start + part.a.shape[0]
                self._dst += [group.a[row, start:end], group.b[row, :, start:end]]
                self._src += [part.a, part.b]
                self._scales.append((group.s, row, start, end, part.sign))
                self._dicts.append(layer.module.scaling)
                self._names.append(part.adapter)
                start = end
        return group

    def _read_scales(self) -> list[Any]:
        return list(map(operator.getitem, self._dicts, self._names))

    def _rescale(self, scales: list[Any]) -> None:
        """Each adapter's scale (with its sign) over its rank columns."""
        for (s, row, start, end, sign), scale, adapter in zip(
            self._scales, scales, self._names, strict=True
        ):
            if not _number(scale):
                raise TorchRefitError(
                    f"The scale of adapter {adapter!r} is {scale!r}; a merged refit needs a "
                    "finite number (peft's set_scale / scale_layer)."
                )
            s[row, 0, start:end] = sign * float(scale)
        self._current = scales

    def check(self) -> None:
        """Refuse a change of the adapters in effect (set_adapter, merge_adapter,
        disable_adapter) since the plan was made: make a new one. O(1) in Python."""
        if self._fast_state:  # one C loop: the attributes, compared with the copies
            now = list(map(_STATE, self._modules))
        else:
            now = [_snapshot(module) for module in self._modules]
        if now != self._state:
            changed = next(
                layer.path
                for layer, was in zip(self.layers, self._state, strict=True)
                if _snapshot(layer.module) != was
            )
            raise TorchRefitError(
                f"The adapters in effect in peft layer {changed!r} changed since the Refitter "
                "was made (set_adapter, merge_adapter, unmerge_adapter or disable_adapter); it "
                "would merge the old ones. Make a new Refitter."
            )

    def __call__(self) -> None:
        """The merged weights from the current A, B, base weights and scales."""
        scales = self._read_scales()
        if scales != self._current:
            self._rescale(scales)
        if self.graph is not None:
            self.graph.replay()
            return
        self._run()

    def _run(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._dst, self._src)
            for group in self.groups:
                group.run()

    def capturable(self) -> bool:
        return self.device.type == "cuda" and all(t.device == self.device for t in self._src)

    def capture(self) -> None:
        """Replay the copies and products as one CUDA graph (every bound tensor on the
        engines' device; the scales are read from device memory, rewritten on a change)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()  # warm up outside the graph
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._run()
        self.graph = graph


def _snapshot(layer: Layer) -> tuple[Any, ...]:
    """What decides the adapters in effect, copied (peft mutates its lists in place)."""
    active, merged, disabled = (getattr(layer, a, None) for a in _STATE_ATTRS)
    return (active if isinstance(active, str) else list(active or ()), list(merged or ()), disabled)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _renamed(name: str, name_map: NameMapping | None) -> str | None:
    if name_map is None:
        return name
    if isinstance(name_map, Mapping):
        return name_map.get(name, name)
    return name_map(name)
