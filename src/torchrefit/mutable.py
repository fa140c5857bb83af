"""MutableModule: a model that compiles itself once and refits itself when its weights change.

Each call checks, cheaply and without comparing outputs, whether the wrapped model's
weights changed since the last call (a replaced tensor, an in-place op, an optimizer step,
`load_state_dict`, and writes through `.data` that bypass the version counter), refits only
the constants that depend on them, and recompiles when the structure changes: the set,
shapes or dtypes of the weights, the inputs beyond the compiled ranges, or the Python state
that the traced `forward` read (`reads.py`: a flag, the active adapter, `training`). A
Python attribute the trace did not read never recompiles, and a variant compiled before is
found again when the state it read comes back. LoRA merges and scales are refits
(`lora.py`). It never returns results computed with stale weights.
"""

from __future__ import annotations

import inspect
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .api import load
from .compile import compile as compile_model
from .decoder import compile_lm
from .errors import IncompatibleWeightsError, InputError, TorchRefitError
from .export import TRACING
from .lm import CompiledLM
from .lora import LoraTrace, lora_trace, lora_views
from .module import CompiledModule
from .reads import Reads, recording, whole_state
from .refit.commit import commit
from .refit.evaluate import evaluate, validate
from .refit.match import Matched, fast
from .refit.read import NewWeights, Source, module_tensors
from .serialize import save
from .settings import Settings

logger = logging.getLogger("torchrefit")

Modules = Mapping[str, torch.nn.Module]


@dataclass(eq=False)
class _Variant:
    """One compiled variant: the state its trace read, the inputs it was compiled for (None:
    any), and what its engines were last given."""

    reads: Reads
    lora: LoraTrace
    inputs: tuple | None
    compiled: CompiledModule
    seen: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict)
    snapshots: dict[str, torch.Tensor] = field(default_factory=dict)  # weights the store hides

    def difference(self, modules: Modules) -> str | None:
        """Why this variant does not stand for the model now; None when it does."""
        return self.reads.difference(modules) or self.lora.difference(modules)


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
            _variants=[],  # _Variant, oldest first
            _lms=[],  # _Variant of a CompiledLM, for generate
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
        variant = self._ready(args, kwargs)
        try:
            return variant.compiled(*args, **kwargs)
        except InputError as exc:
            with self._lock:
                variant = self._compile(args, kwargs, str(exc), replacing=variant)
            return variant.compiled(*args, **kwargs)

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

    def _ready(self, args: tuple, kwargs: dict) -> _Variant:
        """The variant for this call, compiled or refitted as needed; one thread at a time
        (torch.export must not trace one model twice at once)."""
        with self._lock:
            modules = dict(self.model.named_modules())
            variant, reason = self._find(modules, _input_signature(args, kwargs))
            if variant is None:
                return self._compile(args, kwargs, reason)
            if not self._sync(variant, modules):
                return self._compile(
                    args, kwargs, "the weights changed shape, dtype or set", replacing=variant
                )
            return variant

    def _find(self, modules: Modules, inputs: tuple) -> tuple[_Variant | None, str]:
        """The newest variant whose traced reads hold now, or None and why none does."""
        reason = "first call" if not self._variants else "inputs of another structure"
        same_inputs = [v for v in self._variants if v.inputs in (inputs, None)]
        for variant in reversed(same_inputs):
            difference = variant.difference(modules)
            if difference is None:
                return variant, ""
            if variant is same_inputs[-1]:
                reason = difference
        return None, reason

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        **options: Any,
    ) -> Any:
        """The wrapped causal LM's `generate`, run by a `CompiledLM` (compile_lm) that is
        refitted when the weights changed, like a call; it takes `CompiledLM.generate`'s
        options. Options it cannot honour (beam search, streamers, a generation_config that
        asks for them, ...) run the model's own generate, uncompiled, with a warning."""
        model = self.model
        unknown = CompiledLM.unsupported_options(options)
        if unknown or not hasattr(model, "generation_config"):
            reason = f"options {unknown}" if unknown else "a model without a generation_config"
            return self._generate_uncompiled(
                reason, input_ids, attention_mask, max_new_tokens, options
            )
        default = _default_new_tokens(model, getattr(input_ids, "shape", (0,))[-1])
        rows, length, new = CompiledLM.call_size(input_ids, max_new_tokens, options, default)
        with self._lock:
            try:  # the cache must hold rows x (length + new): a view of that shape asks for it
                lm = self._lm_for(input_ids[:1].expand(rows, length), new)
            except TorchRefitError as exc:
                return self._generate_uncompiled(
                    str(exc), input_ids, attention_mask, max_new_tokens, options
                )
        return lm.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new, **options)

    def _lm_for(self, input_ids: torch.Tensor, max_new_tokens: int) -> CompiledLM:
        """A CompiledLM whose cache fits the call, up to date with the weights: a refit when
        they changed; a compile for a new structure or a call beyond every cache."""
        batch, length = input_ids.shape
        modules = dict(self.model.named_modules())
        for variant in reversed(self._lms):
            lm = variant.compiled
            assert isinstance(lm, CompiledLM)
            fits = lm.max_batch_size >= batch and lm.max_seq_len >= length + max_new_tokens
            if fits and variant.difference(modules) is None and self._sync(variant, modules):
                return lm
        limits = (_bucket(batch, 1), _bucket(length + max_new_tokens, 64))
        logger.info("MutableModule: compiling a CompiledLM for (batch, positions) %s", limits)
        variant = self._traced(lambda: compile_lm(self.model, *limits, settings=self._settings))
        self._lms.append(variant)
        assert isinstance(variant.compiled, CompiledLM)
        return variant.compiled

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
        """Bring every compiled variant that stands for the model now up to date with its
        weights (the others are refitted when a call finds them again)."""
        with self._lock:
            modules = dict(self.model.named_modules())
            for variant in [*self._variants, *self._lms]:
                if variant.difference(modules) is None:
                    self._sync(variant, modules)

    def recompile(self) -> None:
        """Drop every compiled variant; the next call compiles again."""
        with self._lock:
            self._variants.clear()
            self._lms.clear()

    def save(self, path: str) -> None:
        """The newest variant that stands for the model now, refitted, in torchrefit's file
        format."""
        with self._lock:
            modules = dict(self.model.named_modules())
            current = [v for v in self._variants if v.difference(modules) is None]
            if not current:
                raise TorchRefitError(
                    "No compiled variant stands for the model as it is now (nothing is "
                    "compiled yet, or its Python state changed since): call the module once "
                    "before save()."
                )
            if not self._sync(current[-1], modules):
                raise TorchRefitError(
                    "The model's weights changed shape, dtype or set since the last call: "
                    "call the module once before save()."
                )
            save(current[-1].compiled, path)

    @classmethod
    def load(cls, path: str, model: torch.nn.Module, **overrides: Any) -> MutableModule:
        """Wrap `model` around a module saved by `save`: no compile for its structure, and
        the model's current weights are refitted in before the first call runs."""
        compiled = load(path)
        mutable = cls(model, settings=compiled.settings, **overrides)
        lora = lora_trace(model)  # what the file's trace read is unknown: all of the state counts
        reads = whole_state(model).without(lora.handled())
        mutable._variants.append(_Variant(reads, lora, None, compiled))  # seen nothing: refit
        return mutable

    # -- internals --------------------------------------------------------------------------

    def _compile(
        self, args: tuple, kwargs: dict, reason: str, replacing: _Variant | None = None
    ) -> _Variant:
        logger.info("MutableModule: compiling (%s)", reason)
        variant = self._traced(
            lambda: compile_model(self.model, args, kwargs or None, settings=self._settings),
            _input_signature(args, kwargs),
        )
        if replacing in self._variants:
            self._variants.remove(replacing)
        self._variants.append(variant)
        return variant

    def _traced(
        self, compile_fn: Callable[[], CompiledModule], inputs: tuple | None = None
    ) -> _Variant:
        """A variant from `compile_fn`, keyed by what its trace read, its weights recorded."""
        lora = lora_trace(self.model)
        with TRACING, recording(self.model) as record:
            compiled = compile_fn()
        variant = _Variant(record.reads().without(lora.handled()), lora, inputs, compiled)
        self.__dict__["compiles"] += 1
        self._record(variant, self._weights(variant, dict(self.model.named_modules())))
        return variant

    def _weights(self, variant: _Variant, modules: Modules) -> dict[str, torch.Tensor]:
        weights = module_tensors(self.model, variant.compiled._torchrefit.specs)
        weights.update(lora_views(modules, variant.lora))
        return weights

    def _sync(self, variant: _Variant, modules: Modules) -> bool:
        """Refit what changed; False when only a recompile can follow the change."""
        with variant.compiled._torchrefit.guard.refit:
            return self._sync_locked(variant, modules)

    def _sync_locked(self, variant: _Variant, modules: Modules) -> bool:
        state = variant.compiled._torchrefit
        current = self._weights(variant, modules)
        named: dict[str, Source] = {
            k: t for k, t in current.items() if k in state.specs or k in state.aliases
        }
        try:  # the match stage checks the set, shapes and dtypes of the weights
            matched = fast(NewWeights(named, "module"), state)
        except IncompatibleWeightsError:
            return False
        changed = self._changed(variant, current)
        if not changed:
            return True
        try:
            self._refit(variant.compiled, matched, changed)
        except TorchRefitError as exc:
            warnings.warn(f"torchrefit: refit failed ({exc}); recompiling", stacklevel=3)
            return False
        self._record(variant, current)
        return True

    def _changed(self, variant: _Variant, current: dict[str, torch.Tensor]) -> set[str]:
        seen = variant.seen
        views = {f for f, t in current.items() if getattr(t, "_torchrefit_view", False)}
        changed = {f for f, t in current.items() if f not in views and seen.get(f) != _identity(t)}
        if self._check_values or views:
            candidates = current if self._check_values else {f: current[f] for f in views}
            changed |= self._changed_values(variant, candidates, skip=changed)
        return changed & set(variant.compiled._torchrefit.specs)

    def _changed_values(
        self, variant: _Variant, current: dict[str, torch.Tensor], skip: set[str]
    ) -> set[str]:
        """Weights whose values differ from what the engines were given (`.data` writes)."""
        state = variant.compiled._torchrefit
        snapshots = variant.snapshots
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

    def _record(self, variant: _Variant, current: dict[str, torch.Tensor]) -> None:
        """Remember each weight's identity, and a copy of those the store cannot stand for."""
        state = variant.compiled._torchrefit
        variant.seen = {f: _identity(t) for f, t in current.items()}
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
        variant.snapshots = snapshots


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


def _input_signature(args: tuple, kwargs: dict) -> tuple:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x)
        for x in leaves
    )
    return (str(spec), described)
