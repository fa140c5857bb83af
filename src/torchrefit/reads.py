"""What a traced forward reads: the Python state of the model's modules that steers it.

A compiled graph keeps the branches its trace took; the Python attributes `forward` read
while tracing (a flag, a scale, the active adapter's name) decide which. `recording(model)`
notes them: during the trace every module runs as a subclass of its own class (made once
per class, named as it is, as FSDP2 subclasses layers) whose attribute lookups note, for
reads made inside the model's own call on the tracing thread, each attribute's value as the
first read found it. The result, `Reads`, is the compile key of the variant: it still holds
while every noted module is at its path with its class, in its `training` mode, and every
noted attribute has its noted value. An attribute nobody read never counts.
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


class _Token:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# An attribute the forward read that is not in the instance's __dict__: a method, a class
# attribute or a property (setting it on the instance later would change what forward sees).
NOT_IN_DICT = _Token("<not in the instance __dict__>")
# An attribute found nowhere (read with getattr's default, or hasattr): it must stay absent.
MISSING = _Token("<missing>")
_NAMES = "__names__"  # in `whole_state`: the instance's attribute names, none added
_TENSOR = _Token("<a tensor>")  # tensors are weights: a change is a refit, not a new variant
_DEPTH = 4  # containers nested deeper than this count by identity
_EMPTY = {  # one snapshot per kind of empty container (a module's hook dicts, mostly)
    kind: (kind, frozenset() if kind in (set, frozenset) else ())
    for kind in (dict, OrderedDict, list, tuple, set, frozenset)
}

Attrs = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Reads:
    """Per module the forward reached: its path, its class and the attributes it read, each
    with its frozen value (see `freeze`). `training` always counts."""

    modules: tuple[tuple[str, type, Attrs], ...]

    def difference(self, modules: Mapping[str, torch.nn.Module]) -> str | None:
        """The first noted state that no longer holds in `modules` (path -> module, as
        `dict(model.named_modules())` gives), or None when the variant still applies."""
        for path, cls, attrs in self.modules:
            module = modules.get(path)
            if module is None or type(module) is not cls:
                return f"module {path or '<root>'!r} is gone or of another class"
            state = module.__dict__
            for attr, frozen in attrs:
                if attr == _NAMES:
                    if _names(state) != frozen:
                        return f"{_where(path, 'attributes')} are others than when saved"
                    continue
                if frozen is MISSING:
                    if _present(state, attr):
                        return f"{_where(path, attr)} was absent when traced and now is set"
                    continue
                value = state.get(attr, NOT_IN_DICT)
                if value is frozen or (
                    type(value) in _EMPTY and not value and frozen is _EMPTY[type(value)]
                ):
                    continue  # the common cases, without a snapshot: unchanged flags, no hooks
                if freeze(value) != frozen:
                    return f"{_where(path, attr)} changed"
        return None

    def without(self, excluded: Mapping[str, set[str]]) -> Reads:
        """These reads less some attributes (path -> names) that are handled as weights."""
        return Reads(
            tuple(
                (path, cls, tuple(a for a in attrs if a[0] not in excluded.get(path, ())))
                for path, cls, attrs in self.modules
            )
        )


def whole_state(model: torch.nn.Module) -> Reads:
    """Every module with every instance attribute, and no new one: the key when the reads
    are unknown (a module loaded from a file), as strict as can be."""
    modules = []
    for path, module in model.named_modules():
        attrs = _all_attrs(module)
        attrs[_NAMES] = _names(vars(module))
        modules.append((path, type(module), _sorted(attrs)))
    return Reads(tuple(modules))


def freeze(value: Any, depth: int = 0) -> Any:
    """`value` as a comparable snapshot: containers copied (a dict mutated in place differs
    from its snapshot), scalars with their type (True, 1 and 1.0 steer a trace differently),
    tensors as one token, any other object by identity."""
    kind = type(value)
    if value is None or kind is str or kind is bool or value is NOT_IN_DICT:
        return value  # True is not 1: a bool snapshot is itself, an int one carries its type
    if kind in _EMPTY and not value:
        return _EMPTY[kind]
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return value
    if isinstance(value, (int, float, complex, str, bytes)):
        return (kind, value)
    if isinstance(value, torch.Tensor):
        return _TENSOR
    if depth < _DEPTH:
        if isinstance(value, (list, tuple)):
            return (kind, tuple(freeze(v, depth + 1) for v in value))
        if isinstance(value, dict):
            return (kind, tuple((k, freeze(v, depth + 1)) for k, v in value.items()))
        if isinstance(value, (set, frozenset)):
            return (kind, frozenset(freeze(v, depth + 1) for v in value))
    return _Identity(value)


class _Identity:
    """Equal only to a snapshot of the same object; a module is held weakly."""

    __slots__ = ("_ref", "_strong")

    def __init__(self, value: Any) -> None:
        try:
            self._ref: Any = weakref.ref(value)
            self._strong = None
        except TypeError:
            self._ref, self._strong = None, value

    def _target(self) -> Any:
        return self._strong if self._ref is None else self._ref()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Identity):
            return False
        target = self._target()
        return target is not None and target is other._target()

    def __hash__(self) -> int:
        return id(self._target())


def _present(state: dict[str, Any], attr: str) -> bool:
    return attr in state or any(
        attr in state.get(group, ()) for group in ("_parameters", "_buffers", "_modules")
    )


def _names(state: dict[str, Any]) -> frozenset[str]:
    return frozenset(k for k in state if k[:2] != "__")


def _where(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _sorted(attrs: dict[str, Any]) -> Attrs:
    return tuple(sorted(attrs.items()))


def _all_attrs(module: torch.nn.Module) -> dict[str, Any]:
    return {k: freeze(v) for k, v in vars(module).items() if not k.startswith("__")}


# -- recording ----------------------------------------------------------------------------------


class _Recording:
    """The reads of one trace (traces hold `export.TRACING`: one thread at a time)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.thread = threading.get_ident()
        self.depth = 0  # > 0 while the model's own call runs: what export does around it is not
        self.modules = list(model.named_modules())
        self.root = vars(model)
        self.paths = {id(vars(m)): path for path, m in self.modules}  # a proxy shares __dict__
        self.read: dict[str, dict[str, Any]] = {}
        self.original: dict[str, type] = {}  # path -> its class before the swap
        self.opaque: set[str] = set()  # modules whose class could not be swapped

    def note(self, module: object, name: str, missing: bool) -> None:
        if self.depth == 0 or name[:2] == "__" or threading.get_ident() != self.thread:
            return
        state = object.__getattribute__(module, "__dict__")
        path = self.paths.get(id(state))
        if path is None:
            return
        read = self.read.setdefault(path, {})
        if name not in read:
            read[name] = MISSING if missing else freeze(state.get(name, NOT_IN_DICT))

    def reads(self) -> Reads:
        modules = []
        for path, module in self.modules:
            if path in self.opaque:
                attrs = _all_attrs(module)
            elif path in self.read:
                attrs = dict(self.read[path])
                attrs.setdefault("training", freeze(module.training))
            else:
                continue  # the forward never reached this module
            modules.append((path, self.original.get(path, type(module)), _sorted(attrs)))
        return Reads(tuple(modules))


_ACTIVE: list[_Recording] = []  # a stack: a model may compile another inside its trace
_CLASSES: dict[tuple[type, bool], type] = {}


@contextmanager
def recording(model: torch.nn.Module) -> Iterator[_Recording]:
    """Note what `model`'s forward reads while the block runs (a trace of it). The classes
    are swapped back when it ends, also on an error; call it holding `export.TRACING`."""
    record = _Recording(model)
    swapped: list[tuple[torch.nn.Module, type]] = []
    _ACTIVE.append(record)
    try:
        for path, module in record.modules:
            cls = type(module)
            try:
                module.__class__ = _recorder(cls, root=module is model)
            except Exception:  # a layout that forbids it (a ScriptModule), a fussy subclass hook
                record.opaque.add(path)  # then all of its state counts
                continue
            swapped.append((module, cls))
            record.original[path] = cls
        yield record
    finally:
        for module, cls in reversed(swapped):
            module.__class__ = cls
        _ACTIVE.remove(record)


def _note(module: object, name: str, missing: bool) -> None:
    for record in _ACTIVE:
        record.note(module, name, missing)


def _recorder(cls: type, root: bool) -> type:
    """`cls` with its attribute lookups noted; for the model itself, its call opens the
    window in which reads count."""
    made = _CLASSES.get((cls, root))
    if made is not None:
        return made

    lookup: Any = cls.__getattribute__

    def __getattribute__(self: Any, name: str) -> Any:
        value = lookup(self, name)
        if _ACTIVE:
            _note(self, name, False)
        return value

    def __getattr__(self: Any, name: str) -> Any:
        try:
            return cls.__getattr__(self, name)  # type: ignore[attr-defined]
        except AttributeError:
            if _ACTIVE:
                _note(self, name, True)
            raise

    namespace: dict[str, Any] = {
        "__getattribute__": __getattribute__,
        "__getattr__": __getattr__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    if root:

        def _call_impl(self: Any, *args: Any, **kwargs: Any) -> Any:
            state = object.__getattribute__(self, "__dict__")
            record = next((r for r in reversed(_ACTIVE) if r.root is state), None)
            if record is None or threading.get_ident() != record.thread:
                return cls._call_impl(self, *args, **kwargs)  # type: ignore[attr-defined]
            record.depth += 1
            try:
                return cls._call_impl(self, *args, **kwargs)  # type: ignore[attr-defined]
            finally:
                record.depth -= 1

        namespace["_call_impl"] = _call_impl
    made = _CLASSES[(cls, root)] = type(cls.__name__, (cls,), namespace)
    return made
