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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

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
