"""MutableModule: a model that compiles itself once and refits itself when its weights change.

Each call checks, cheaply and without comparing outputs, whether the wrapped model's
weights changed since the last call (a replaced tensor, an in-place op, an optimizer step,
`load_state_dict`, and writes through `.data` that bypass the version counter), refits only
the constants that depend on them, and recompiles when the structure changes: the set,
shapes or dtypes of the weights, the inputs beyond the compiled ranges, or the Python state
that steers `forward` (`training`, a LoRA adapter's merged flag). It never returns results
computed with stale weights.
"""

from __future__ import annotations

import inspect
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from .api import load
from .compile import compile as compile_model
from .decoder import compile_lm
from .errors import IncompatibleWeightsError, InputError, TorchRefitError
from .lm import CompiledLM
from .module import CompiledModule
from .refit.commit import commit
from .refit.evaluate import evaluate, validate
from .refit.match import Matched, fast
from .refit.read import NewWeights, Source, module_tensors
from .serialize import save
from .settings import Settings

logger = logging.getLogger("torchrefit")

_SIMPLE = (bool, int, float, str, type(None))


class MutableModule(torch.nn.Module):
    """Wraps `model`; compiles on the first call with that call's inputs (settings as for
    `torchrefit.compile`). `check_values=False` skips the comparison of weight values that
    catches `.data` writes (cheaper; version counters and tensor identity still count)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        check_values: bool = True,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.__dict__.update(
            model=model,
            _settings=Settings.from_overrides(settings, **overrides),
            _check_values=check_values,
            _compiled={},  # (state signature, input signature) -> CompiledModule
            _seen={},  # id(compiled) -> {FQN: (id, data_ptr, version)}
            _snapshots={},  # id(compiled) -> {FQN: copy}, for weights the store cannot show
            _traced_merges={},  # id(compiled) -> {LoRA layer: adapters merged when traced}
            _lms={},  # (state signature, (batch, positions)) -> CompiledLM, for generate
            compiles=0,
            refits=0,
            _lock=threading.RLock(),
        )

    # -- behave like the wrapped model ------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["model"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.load_state_dict(*args, **kwargs)

    def named_parameters(
        self, *args: Any, **kwargs: Any
    ) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.model.named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters(recurse)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_buffers(*args, **kwargs)

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        return self.model.buffers(recurse)

    def train(self, mode: bool = True) -> MutableModule:
        self.model.train(mode)
        return self

    # -- calls ------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._normalized(args, kwargs)
        key, compiled = self._ready(args, kwargs)
        try:
            return compiled(*args, **kwargs)
        except InputError as exc:
            with self._lock:
                compiled = self._compile(key, args, kwargs, str(exc))
            return compiled(*args, **kwargs)

    def _normalized(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call bound to the model's forward, each argument positional where it can be:
        `m(x)` and `m(x=x)` are one call, one compiled variant."""
        forward = self.model.forward
        function = getattr(forward, "__func__", forward)
        cached = self.__dict__.get("_forward_signature")
        if cached is None or cached[0] is not function:
            try:
                signature: inspect.Signature | None = inspect.signature(forward)
            except (TypeError, ValueError):
                signature = None
            cached = self.__dict__["_forward_signature"] = (function, signature)
        if cached[1] is None:
            return args, kwargs
        try:
            bound = cached[1].bind(*args, **kwargs)
        except TypeError as exc:
            raise InputError(
                f"The call does not fit {type(self.model).__name__}.forward{cached[1]}: {exc}."
            ) from None
        return bound.args, bound.kwargs

    def _ready(self, args: tuple, kwargs: dict) -> tuple[tuple, CompiledModule]:
        """The variant for this call, compiled or refitted as needed; one thread at a time
        (torch.export must not trace one model twice at once)."""
        with self._lock:
            state = _state_signature(self.model)
            key = (state, _input_signature(args, kwargs))
            compiled = self._compiled.get(key, self._compiled.get((state, None)))
            if compiled is None:
                compiled = self._compile(key, args, kwargs, "first call with this structure")
            elif not self._sync(compiled):
                compiled = self._compile(
                    key, args, kwargs, "the weights changed shape, dtype or set"
                )
            return key, compiled

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """The wrapped causal LM's `generate`, run by a `CompiledLM` (compile_lm) that is
        refitted when the weights changed, like a call. Options it does not take (beam
        search, streamers, ...) run the model's own generate, uncompiled, with a warning."""
        model = self.model
        unknown = sorted(set(options) - _GENERATE_OPTIONS)
        if unknown or not hasattr(model, "generation_config"):
            reason = f"options {unknown}" if unknown else "a model without a generation_config"
            return self._generate_uncompiled(
                reason, input_ids, attention_mask, max_new_tokens, options
            )
        if max_new_tokens is None:
            max_new_tokens = _default_new_tokens(model, input_ids.shape[-1])
        with self._lock:
            try:
                lm = self._lm_for(input_ids, max_new_tokens)
            except TorchRefitError as exc:
                return self._generate_uncompiled(
                    str(exc), input_ids, attention_mask, max_new_tokens, options
                )
        return lm.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **options
        )

    def _lm_for(self, input_ids: torch.Tensor, max_new_tokens: int) -> CompiledLM:
        """A CompiledLM whose cache fits the call, up to date with the weights: a refit when
        they changed, a compile for a new structure or a call beyond every cache."""
        batch, length = input_ids.shape
        state = _state_signature(self.model)
        for key, lm in list(self._lms.items()):
            if key[0] != state:
                continue
            if lm.max_batch_size >= batch and lm.max_seq_len >= length + max_new_tokens:
                if self._sync(lm):
                    return lm
                del self._lms[key]
        limits = (_bucket(batch, 1), _bucket(length + max_new_tokens, 64))
        logger.info("MutableModule: compiling a CompiledLM for %s (batch, positions)", limits)
        lm = compile_lm(self.model, *limits, settings=self._settings)
        self._lms[(state, limits)] = lm
        self._traced_merges[id(lm)] = _merges(self.model)
        self.__dict__["compiles"] += 1
        self._record(lm, self._weights(lm))
        return lm

    def _generate_uncompiled(
        self,
        reason: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int | None,
        options: dict[str, Any],
    ) -> Any:
        if not self.__dict__.get("_warned_generate"):
            self.__dict__["_warned_generate"] = True
            warnings.warn(
                f"MutableModule.generate runs the wrapped model's own generate, uncompiled "
                f"({reason[:300]}); calls of the MutableModule itself run compiled engines.",
                stacklevel=3,
            )
        kwargs = dict(options)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        return self.model.generate(input_ids, **kwargs)

    def refit(self) -> None:
        """Bring every compiled variant up to date with the model's weights now."""
        with self._lock:
            for compiled in [*self._compiled.values(), *self._lms.values()]:
                self._sync(compiled)

    def recompile(self) -> None:
        """Drop every compiled variant; the next call compiles again."""
        self._compiled.clear()
        self._lms.clear()
        self._seen.clear()
        self._snapshots.clear()

    def save(self, path: str) -> None:
        """The most recently compiled variant, in torchrefit's file format."""
        if not self._compiled:
            raise TorchRefitError("Nothing is compiled yet: call the module once before save().")
        self._sync(next(reversed(self._compiled.values())))
        save(next(reversed(self._compiled.values())), path)

    @classmethod
    def load(cls, path: str, model: torch.nn.Module, **overrides: Any) -> MutableModule:
        """Wrap `model` around a module saved by `save`: no compile for its structure, and
        the model's current weights are refitted in before the first call runs."""
        compiled = load(path)
        mutable = cls(model, settings=compiled.settings, **overrides)
        mutable._compiled[(_state_signature(model), None)] = compiled
        mutable._traced_merges[id(compiled)] = _merges(model)
        mutable._seen[id(compiled)] = {}  # every weight counts as changed: refit on first call
        return mutable

    # -- internals --------------------------------------------------------------------------

    def _compile(self, key: tuple, args: tuple, kwargs: dict, reason: str) -> CompiledModule:
        logger.info("MutableModule: compiling (%s)", reason)
        compiled = compile_model(self.model, args, kwargs or None, settings=self._settings)
        self._compiled[key] = compiled
        self._traced_merges[id(compiled)] = _merges(self.model)
        self.__dict__["compiles"] += 1
        self._record(compiled, self._weights(compiled))
        return compiled

    def _weights(self, compiled: CompiledModule) -> dict[str, torch.Tensor]:
        weights = module_tensors(self.model, compiled._torchrefit.specs)
        weights.update(_lora_views(self.model, self._traced_merges.get(id(compiled), {})))
        return weights

    def _sync(self, compiled: CompiledModule) -> bool:
        """Refit what changed; False when only a recompile can follow the change."""
        with compiled._torchrefit.guard.refit:
            return self._sync_locked(compiled)

    def _sync_locked(self, compiled: CompiledModule) -> bool:
        state = compiled._torchrefit
        current = self._weights(compiled)
        named: dict[str, Source] = {
            k: t for k, t in current.items() if k in state.specs or k in state.aliases
        }
        try:  # the match stage checks the set, shapes and dtypes of the weights
            matched = fast(NewWeights(named, "module"), state)
        except IncompatibleWeightsError:
            return False
        changed = self._changed(compiled, current)
        if not changed:
            return True
        try:
            self._refit(compiled, matched, changed)
        except TorchRefitError as exc:
            warnings.warn(f"torchrefit: refit failed ({exc}); recompiling", stacklevel=3)
            return False
        self._record(compiled, current)
        return True

    def _changed(self, compiled: CompiledModule, current: dict[str, torch.Tensor]) -> set[str]:
        seen = self._seen.get(id(compiled), {})
        views = {f for f, t in current.items() if getattr(t, "_torchrefit_view", False)}
        changed = {f for f, t in current.items() if f not in views and seen.get(f) != _identity(t)}
        if self._check_values or views:
            candidates = current if self._check_values else {f: current[f] for f in views}
            changed |= self._changed_values(compiled, candidates, skip=changed)
        return changed & set(compiled._torchrefit.specs)

    def _changed_values(
        self, compiled: CompiledModule, current: dict[str, torch.Tensor], skip: set[str]
    ) -> set[str]:
        """Weights whose values differ from what the engines were given (`.data` writes)."""
        state = compiled._torchrefit
        snapshots = self._snapshots.get(id(compiled), {})
        pairs = []
        for fqn, tensor in current.items():
            if fqn in skip:
                continue
            reference = snapshots.get(fqn)
            if (
                reference is None
                and fqn in state.store.tensors
                and state.lineage[fqn].kind == "identity"
            ):
                reference = state.store[fqn]
            if (
                reference is not None
                and reference.device == tensor.device
                and reference.shape == tensor.shape
            ):
                pairs.append((fqn, tensor, reference))
        if not pairs:
            return set()
        flags = torch.stack([torch.ne(t, r).any() for _, t, r in pairs]).tolist()
        return {fqn for (fqn, _, _), differs in zip(pairs, flags, strict=True) if differs}

    def _refit(self, compiled: CompiledModule, matched: Matched, changed: set[str]) -> None:
        state = compiled._torchrefit
        touched = {k for k, lineage in state.lineage.items() if changed & set(lineage.sources)}
        values = evaluate(matched, state, keys=touched)
        validate(values, state)
        commit(compiled, values, in_place=True)
        self.__dict__["refits"] += 1
        logger.debug(
            "MutableModule: refitted %d constants (%d weights changed)", len(touched), len(changed)
        )

    def _record(self, compiled: CompiledModule, current: dict[str, torch.Tensor]) -> None:
        """Remember each weight's identity, and a copy of those the store cannot stand for."""
        state = compiled._torchrefit
        self._seen[id(compiled)] = {f: _identity(t) for f, t in current.items()}
        if not self._check_values:
            return
        snapshots = {}
        for fqn, tensor in current.items():
            stored = state.store.tensors.get(fqn)
            shown = (
                stored is not None
                and state.lineage[fqn].kind == "identity"
                and stored.device == tensor.device
            )
            if fqn in state.specs and not shown:
                snapshots[fqn] = tensor.detach().clone()
        self._snapshots[id(compiled)] = snapshots


_GENERATE_OPTIONS = frozenset(
    {"do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "generator"}
)


def _default_new_tokens(model: torch.nn.Module, prompt: int) -> int:
    """transformers' default: generation_config.max_new_tokens, else up to max_length."""
    config: Any = model.generation_config
    if getattr(config, "max_new_tokens", None):
        return int(config.max_new_tokens)
    return max(1, int(getattr(config, "max_length", 20) or 20) - prompt)


def _bucket(n: int, least: int) -> int:
    """The power of two at or above `n` (and `least`): a few caches serve every call."""
    return max(least, 1 << (n - 1).bit_length())


def _identity(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """Storage and version counter (shared by detached views): a new tensor or an in-place
    write changes it. Writes through `.data` do not: the value check catches those."""
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape))


def _state_signature(model: torch.nn.Module) -> tuple:
    """The plain Python state of every submodule: what `forward` may branch on."""
    items = []
    for name, module in model.named_modules():
        lora = _is_lora(module)
        for attr, value in vars(module).items():
            if lora and attr == "merged_adapters":
                continue  # a merge is a weight change: see _lora_views
            if isinstance(value, _SIMPLE) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, _SIMPLE) for v in value)
            ):
                items.append((name, attr, tuple(value) if isinstance(value, list) else value))
    return tuple(items)


def _input_signature(args: tuple, kwargs: dict) -> tuple:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x)
        for x in leaves
    )
    return (str(spec), described)


# -- LoRA (peft): a merge or unmerge is a change of weights, not of structure -------------------
#
# peft's merge adds each adapter's delta to the base weight (through `.data`) and then skips
# the adapter branch in forward. A compiled graph keeps the branches it was traced with; so
# the weight it is given for the base layer is the current weight moved to the traced merge
# state: W - delta(merged now) + delta(merged when traced). The outputs equal eager's, and
# merging or unmerging is a refit.


def _is_lora(module: torch.nn.Module) -> bool:
    return (
        hasattr(module, "get_delta_weight")
        and hasattr(module, "base_layer")
        and hasattr(module, "merged_adapters")
    )


def _merges(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    return {name: tuple(m.merged_adapters) for name, m in model.named_modules() if _is_lora(m)}


def _lora_views(
    model: torch.nn.Module, traced: dict[str, tuple[str, ...]]
) -> dict[str, torch.Tensor]:
    views: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not _is_lora(module):
            continue
        now, then = tuple(module.merged_adapters), traced.get(name, ())
        if now == then:
            continue
        weight = module.base_layer.weight
        with torch.no_grad():
            view = weight.detach().clone()
            for adapter in now:
                view -= module.get_delta_weight(adapter).to(view.dtype)
            for adapter in then:
                view += module.get_delta_weight(adapter).to(view.dtype)
        view._torchrefit_view = True  # type: ignore[attr-defined]
        views[f"{name}.base_layer.weight" if name else "base_layer.weight"] = view
    return views
