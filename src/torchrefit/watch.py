"""Writes through `.data`, seen where they happen instead of by reading every weight.

An in-place write through `param.data` (peft's LoRA merge does `weight.data += delta`; RL
loaders do `param.data.copy_(new)`) goes through an alias with a version counter of its
own: the parameter's `_version` never moves, so only its values could tell. Comparing
every weight's values on every call costs a read of all of them; this costs nothing until
`.data` is used.

A `Watch` swaps the class of each watched parameter (exactly `torch.nn.Parameter`) for a
subclass of it whose `data` property notes each access, the getter's and the setter's,
then does what the original does. A watch keeps, per weight name, a stamp that moves with
every access, and the aliases the getter handed out while they live (a write through an
alias held across calls counts on every call). The subclass is named and pickled as
`Parameter` (pickles and `copy.deepcopy` give plain parameters); classes are swapped back
when the last watch of a parameter goes (its `MutableModule` is collected or closed).
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

_DATA = torch._C.TensorBase.__dict__["data"]  # the original getter and setter
_PARAMETER = torch.nn.Parameter
_STAMPS = itertools.count(1)
_LOCK = threading.RLock()  # re-entered: an alias may die (its callback) while it is held


class Watch:
    """The `.data` accesses of the parameters it watches, by weight name."""

    def __init__(self) -> None:
        self.stamps: dict[str, int] = {}  # name -> stamp of its last `.data` access (or death
        # of an alias from it: a write through it may have landed before it died)
        self.live: dict[str, int] = {}  # name -> how many aliases from `.data` are alive
        self._refs: set[weakref.ref[torch.Tensor]] = set()
        self.aliased: set[int] = set()  # ids of parameters aliased when the watch began
        self.watched: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = {}
        self._finalizer = weakref.finalize(self, _release, self.watched)

    def watch(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Start watching these parameters (others, and parameter subclasses, are not)."""
        groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for name, tensor in named:
            if type(tensor) is _PARAMETER or type(tensor) is _Watched:
                groups.setdefault(id(tensor), (tensor, []))[1].append(name)
        with _LOCK:
            for key, (tensor, names) in groups.items():
                known = self.watched.get(key)
                if known is not None and known[0] is tensor and set(known[1]) == set(names):
                    continue
                self.watched[key] = (tensor, tuple(names))
                if _aliased(tensor):  # aliases taken before the watch: they go unseen
                    self.aliased.add(key)
                _watchers(tensor).add(self)
                tensor.__class__ = _Watched

    def covers(self, tensor: torch.Tensor) -> bool:
        """Whether `.data` accesses of `tensor` reach this watch."""
        entry = self.watched.get(id(tensor))
        return entry is not None and entry[0] is tensor and type(tensor) is _Watched

    def unseen_aliases(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` still has an alias taken before the watch began (a `.data`
        alias's writes move no version counter and were not noted: compare its values).
        Once such aliases are gone it is watched like the rest."""
        key = id(tensor)
        if key not in self.aliased:
            return False
        if _aliased(tensor):
            return True
        self.aliased.discard(key)
        return False

    def covers_all(self, names: Any, model: torch.nn.Module) -> bool:
        """Whether every weight among `names` is a parameter of `model` this watch sees (no
        buffer or constant that only a comparison of values could follow)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        return all(n in params and self.covers(params[n]) for n in names)

    def accessed(self, seen: dict[str, int]) -> tuple[set[str], dict[str, int]]:
        """Names accessed through `.data` (or whose alias died) since the stamps in `seen`,
        and names with an alias alive; with the stamps to record once they are refitted.
        Reads only: a refit that fails records nothing, and the next call sees them again."""
        with _LOCK:
            stamps = dict(self.stamps)
            changed = {n for n, stamp in stamps.items() if seen.get(n) != stamp}
            changed.update(self.live)
        return changed, stamps

    def note(self, tensor: torch.Tensor, alias: torch.Tensor | None) -> None:
        with _LOCK:
            entry = self.watched.get(id(tensor))
            if entry is None or entry[0] is not tensor:
                return
            names = entry[1]
            stamp = next(_STAMPS)
            for name in names:
                self.stamps[name] = stamp
            if alias is not None:
                callback = functools.partial(_alias_died, weakref.ref(self), names)
                self._refs.add(weakref.ref(alias, callback))
                for name in names:
                    self.live[name] = self.live.get(name, 0) + 1

    def died(self, names: tuple[str, ...], ref: weakref.ref[torch.Tensor]) -> None:
        with _LOCK:
            self._refs.discard(ref)
            stamp = next(_STAMPS)
            for name in names:
                self.stamps[name] = stamp
                count = self.live.get(name, 0) - 1
                if count > 0:
                    self.live[name] = count
                else:
                    self.live.pop(name, None)

    def close(self) -> None:
        """Stop watching: parameters no other watch has go back to their class."""
        with _LOCK:
            for tensor, _ in self.watched.values():
                _watchers(tensor).discard(self)
        self._finalizer()


# id(parameter) -> the watches it reports to (a tensor's == is elementwise, so tensors are
# keyed by id, their entry dropped when they are collected)
_WATCHERS: dict[int, tuple[weakref.ref[torch.Tensor], weakref.WeakSet[Watch]]] = {}


def _watchers(tensor: torch.Tensor) -> weakref.WeakSet[Watch]:
    key = id(tensor)
    found = _WATCHERS.get(key)
    if found is None or found[0]() is not tensor:
        ref = weakref.ref(tensor, functools.partial(_forget, key))
        found = _WATCHERS[key] = (ref, weakref.WeakSet())
    return found[1]


def _alias_died(
    watch: weakref.ref[Watch], names: tuple[str, ...], ref: weakref.ref[torch.Tensor]
) -> None:
    found = watch()
    if found is not None:
        found.died(names, ref)


def _aliased(tensor: torch.Tensor) -> bool:
    """Whether another tensor shares this one's memory now: more references to its
    storage than this tensor's and the storage object asked."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) > 2


def _forget(key: int, _: object) -> None:
    _WATCHERS.pop(key, None)


def _release(watched: dict[int, tuple[torch.Tensor, tuple[str, ...]]]) -> None:
    with _LOCK:
        for tensor, _ in watched.values():
            if not _watchers(tensor) and type(tensor) is _Watched:
                tensor.__class__ = _PARAMETER  # type: ignore[assignment]
        watched.clear()


def _noted(tensor: torch.Tensor, alias: torch.Tensor | None) -> None:
    found = _WATCHERS.get(id(tensor))
    if found is None or found[0]() is not tensor:
        return
    for watch in list(found[1]):
        watch.note(tensor, alias)


def _get_data(self: torch.Tensor) -> torch.Tensor:
    alias = _DATA.__get__(self)
    _noted(self, alias)
    return alias


def _set_data(self: torch.Tensor, value: torch.Tensor) -> None:
    _DATA.__set__(self, value)
    _noted(self, None)


def _deepcopy(self: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """A copy is a plain Parameter: no watch knows it."""
    copied = _PARAMETER.__deepcopy__(self, memo)
    if type(copied) is _Watched:
        copied.__class__ = _PARAMETER  # type: ignore[assignment]
    return copied


class _Watched(_PARAMETER):
    """A watched `torch.nn.Parameter`: `.data` notes each access, then does what it does."""

    data = property(_get_data, _set_data)  # type: ignore[assignment]
    __deepcopy__ = _deepcopy  # type: ignore[assignment]


_Watched.__name__ = _Watched.__qualname__ = "Parameter"
_Watched.__module__ = _PARAMETER.__module__
