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
from .errors import IncompatibleWeightsError, InputError, TorchRefitError, WeightValueError
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
from .watch import Watch

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
    stamps: dict[str, int] = field(default_factory=dict)  # `.data` accesses refitted
    all_watched: bool = False  # every weight a parameter the watch sees: no value compared
    shared: set[str] = field(default_factory=set)  # aliased by another tensor at the last sync
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
            _watch=Watch() if check_values else None,
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
        """Refit every compiled variant that stands for the model now from all of its
        weights, as they are (the others are refitted when a call finds them again): for
        writes no call can see, which bypass both the version counter and `.data` (a
        collective writing into a parameter, a NumPy view of one, a storage-level copy)."""
        with self._lock:
            modules = dict(self.model.named_modules())
            for variant in [*self._variants, *self._lms]:
                if variant.difference(modules) is None:
                    variant.seen = {}  # every weight counts as changed
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
        the model's current weights are refitted in before the first call runs. Later
        compiles take the settings given here (`settings=`, keyword overrides), as
        `MutableModule(model, ...)` does: the file's settings describe its engines only, and
        never seed a compile or name a cache directory."""
        compiled = load(path)
        mutable = cls(model, **overrides)
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
        seen, _ = self._identities()  # before the trace reads the weights
        with TRACING, recording(self.model) as record:
            compiled = compile_fn()
        variant = _Variant(record.reads().without(lora.handled()), lora, inputs, compiled)
        self.__dict__["compiles"] += 1
        self._watch_weights(variant)
        if self._watch is not None:
            variant.stamps = dict(self._watch.stamps)
        variant.seen = seen
        variant.snapshots = self._snapshots(
            variant, self._weights(variant, dict(self.model.named_modules()))
        )
        return variant

    def _identities(self) -> tuple[dict[str, tuple[int, int, tuple[int, ...]]], set[str]]:
        """Each weight's storage, version and shape, as the next refit will read it; and
        the parameters that still have an alias taken before the watch began (a `.data`
        alias's writes go unseen): those are compared by value while it lives."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        watch = self._watch
        shared = {f for f, t in params.items() if watch.unseen_aliases(t)} if watch else set()
        tensors: dict[str, torch.Tensor] = dict(params)
        tensors.update(self.model.named_buffers(remove_duplicate=False))
        return {f: _identity(t) for f, t in tensors.items()}, shared

    def _weights(self, variant: _Variant, modules: Modules) -> dict[str, torch.Tensor]:
        weights = module_tensors(self.model, variant.compiled._torchrefit.specs)
        weights.update(lora_views(modules, variant.lora))
        return weights

    def _watch_weights(self, variant: _Variant) -> None:
        """`.data` accesses of the model's parameters that the variant holds reach the watch
        (a parameter replaced since is watched from now on)."""
        if self._watch is None:
            return
        specs = variant.compiled._torchrefit.specs
        named = self.model.named_parameters(remove_duplicate=False)
        self._watch.watch((n, p) for n, p in named if n in specs)
        variant.all_watched = self._watch.covers_all(specs, self.model)

    def _sync(self, variant: _Variant, modules: Modules) -> bool:
        """Refit what changed; False when only a recompile can follow the change."""
        with variant.compiled._torchrefit.guard.refit:
            return self._sync_locked(variant, modules)

    def _sync_locked(self, variant: _Variant, modules: Modules) -> bool:
        state = variant.compiled._torchrefit
        seen, shared = self._identities()  # taken before any value is read: a write that
        if self._unchanged(variant, seen, shared):  # lands during the refit counts next call
            return True
        current = self._weights(variant, modules)
        named: dict[str, Source] = {
            k: t for k, t in current.items() if k in state.specs or k in state.aliases
        }
        try:  # the match stage checks the set, shapes and dtypes of the weights
            matched = fast(NewWeights(named, "module"), state)
        except IncompatibleWeightsError:
            return False
        changed, stamps = self._changed(variant, current, seen, shared)
        if changed:
            snapshots = self._snapshots(variant, current)  # what this refit reads
            try:
                self._refit(variant.compiled, matched, changed)
            except WeightValueError:
                raise  # refused (NaN, inf): the engines keep their weights; never recompile
            except TorchRefitError as exc:
                warnings.warn(f"torchrefit: refit failed ({exc}); recompiling", stacklevel=3)
                return False
            variant.snapshots.update(snapshots)
            self._watch_weights(variant)
        variant.seen, variant.stamps, variant.shared = seen, stamps, shared
        return True

    def _unchanged(
        self,
        variant: _Variant,
        seen: dict[str, tuple[int, int, tuple[int, ...]]],
        shared: set[str],
    ) -> bool:
        """Whether nothing can have changed, known without reading a value: the same weights
        with the same storage and versions, no `.data` access, no LoRA layer (their views
        are computed), and nothing compared by value (every weight watched)."""
        if seen != variant.seen or variant.lora.merged or shared or variant.shared:
            return False
        if self._watch is not None:
            if self._watch.accessed(variant.stamps)[0]:
                return False
            if self._check_values and not variant.all_watched:
                return False
        elif self._check_values:
            return False
        return True

    def _changed(
        self,
        variant: _Variant,
        current: dict[str, torch.Tensor],
        seen: dict[str, tuple[int, int, tuple[int, ...]]],
        shared: set[str],
    ) -> tuple[set[str], dict[str, int]]:
        """The weights that changed since the variant's last refit, and the `.data`
        stamps to record once they are refitted: a new tensor or an in-place write (the
        version counter), a `.data` access of a watched parameter, and, by comparing
        values, LoRA views and (with check_values) every weight the watch cannot see."""
        changed = {f for f in current if variant.seen.get(f) != seen.get(f)}
        stamps = variant.stamps
        if self._watch is not None:
            accessed, stamps = self._watch.accessed(variant.stamps)
            changed |= accessed
        compare = {f for f, t in current.items() if getattr(t, "_torchrefit_view", False)}
        if self._check_values:
            owned = dict(self.model.named_parameters(remove_duplicate=False))
            watch = self._watch
            compare |= {
                f
                for f in current
                if f not in owned
                or watch is None
                or not watch.covers(owned[f])
                or f in shared
                or f in variant.shared  # its alias died since: a write may have landed
            }
        candidates = {f: current[f] for f in compare - changed}
        changed |= self._changed_values(variant, candidates)
        return changed & set(variant.compiled._torchrefit.specs), stamps

    def _changed_values(self, variant: _Variant, current: dict[str, torch.Tensor]) -> set[str]:
        """Weights whose values differ from what the engines were given (`.data` writes)."""
        state = variant.compiled._torchrefit
        snapshots = variant.snapshots
        pairs = []
        for fqn, tensor in current.items():
            reference = snapshots.get(fqn)
            if (
                reference is None
                and fqn in state.store.tensors
                and state.lineage[fqn].kind == "identity"
            ):
                reference = state.store[fqn]
            if reference is None or reference.device != tensor.device:
                continue
            if reference.shape != tensor.shape or not torch.equal(reference, tensor):
                pairs.append(fqn)
        return set(pairs)

    def _refit(self, compiled: CompiledModule, matched: Matched, changed: set[str]) -> None:
        state = compiled._torchrefit
        touched = {
            k: None for k, lineage in state.lineage.items() if changed & set(lineage.sources)
        }
        values = evaluate(matched, state, keys=set(touched))
        validate(values, state)
        commit(compiled, values, in_place=True)
        self.__dict__["refits"] += 1
        logger.debug(
            "MutableModule: refitted %d constants (%d weights changed)", len(touched), len(changed)
        )

    def _snapshots(
        self, variant: _Variant, current: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Copies of the weights compared by value that the store cannot stand for (cast or
        derived constants, LoRA views): what the next comparison is against."""
        if not self._check_values:
            return {}
        state = variant.compiled._torchrefit
        owned = dict(self.model.named_parameters(remove_duplicate=False))
        watch = self._watch
        snapshots = {}
        for fqn, tensor in current.items():
            if fqn not in state.specs:
                continue
            if fqn in owned and watch is not None and watch.covers(owned[fqn]):
                continue  # `.data` accesses are seen where they happen
            stored = state.store.tensors.get(fqn)
            shown = (
                stored is not None
                and state.lineage[fqn].kind == "identity"
                and stored.device == tensor.device
            )
            if not shown:
                snapshots[fqn] = tensor.detach().clone()
        return snapshots


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
    write changes it. Writes through `.data` do not: the watch or the value check sees
    those."""
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape))


def _input_signature(args: tuple, kwargs: dict) -> tuple:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x)
        for x in leaves
    )
    return (str(spec), described)
