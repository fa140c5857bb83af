"""The commit stage: the only code that writes new values into a weight store.

Call after `validate`. Each write is a `Transfer` (transfer.py): every source fetched once,
checked for NaN and inf where it is copied, and a store that calls compute with (a plain
module's) written only once every value has passed, gated on the device. A
double-buffered module's standby bank, and the new store of an `in_place=False` copy, are
written directly and checked as they are written; a refused refit never flips to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from ..module import CompiledModule, clone_module
from ..weights import WeightStore
from .evaluate import Values
from .transfer import Transfer, copy_into

logger = logging.getLogger("torchrefit")


class Writer(Protocol):
    """One write into a store: `stage` reads and checks (a live store stays untouched),
    `write` writes (around a live store the write lock is held), `verdict` raises for a
    refused value."""

    def stage(self) -> None: ...

    def write(self) -> None: ...

    def verdict(self) -> None: ...


def commit(
    module: CompiledModule, values: Values, in_place: bool, check: bool | None = None
) -> CompiledModule:
    """`module` (or, with in_place=False, a new module sharing its engines) holding `values`.

    `check` (default: the module's `Settings.check_finite`) refuses NaN, and inf where the
    compiled constant held none, before anything is served. A copy gets a store of its own:
    each constant is copied once, from `values` or, for the constants the refit leaves
    alone, from the original."""
    state = module._torchrefit
    checked = state.settings.check_finite if check is None else check
    if in_place:
        commit_by(
            module,
            values.keys(),
            lambda store, live: Transfer(state, store, values, check=checked, live=live),
        )
        return module
    target = _copy_for(module, values.keys())
    rewrite(target, values, checked)
    target._torchrefit.unset -= values.keys()  # what this refit supplied is set in the copy
    return target


def commit_by(
    module: CompiledModule, keys: set[str], make: Callable[[WeightStore, bool], Writer]
) -> None:
    """In place: the writer `make(store, live)` writes the constants `keys` into `store`.

    Plainly, `store` is the active buffer (live): checked first, written while no call
    runs. Double-buffered, it is the standby: brought up to date, written and checked while
    calls go on, then flipped to; a refused or failed refit never flips."""
    state = module._torchrefit
    active = state.store
    if not state.settings.double_buffer:
        writer = make(active, True)
        writer.stage()
        with state.guard.writing(active.device):
            writer.write()
        writer.verdict()
        if state.unset:
            state.unset -= keys
        return
    if state.standby is None:
        written = {k for k, lineage in state.lineage.items() if lineage.kind == "state"}
        # what the forward writes (a KV cache, a counter) is one memory in both banks
        state.standby = active.empty_like(shared=written)
        state.stale = set(active.keys()) - written
    standby = state.standby
    if active.device.type == "cuda":
        state.guard.after_commits(active.device)  # the last refit's writes, on any stream
        state.guard.wait_for_calls(active.device)  # calls launched before the last flip read it
    if state.stale - keys:  # until the flip, the standby is a mix
        write(standby, {k: active[k] for k in state.stale - keys})
    state.stale |= keys
    writer = make(standby, False)
    writer.stage()
    writer.write()
    writer.verdict()
    with state.guard.writing(active.device):
        module.bind(standby)
        state.standby, state.stale = active, set(keys)
        if state.unset:
            state.unset -= keys
    logger.debug("double buffer: flipped to the standby weights (%d constants refitted)", len(keys))


def rewrite(module: CompiledModule, values: Values, check: bool | None = None) -> None:
    """`values` straight into the store of a module no one calls yet (a refit's copy, before
    it is returned), checked as they are written."""
    state = module._torchrefit
    checked = state.settings.check_finite if check is None else check
    writer = Transfer(state, state.store, values, check=checked, live=False)
    writer.write()
    writer.verdict()


def _copy_for(module: CompiledModule, refitted: set[str]) -> CompiledModule:
    old = module._torchrefit.store
    store = old.empty_like()
    write(store, {k: t for k, t in old.tensors.items() if k not in refitted})
    return clone_module(module, store)


def write(store: WeightStore, values: dict[str, torch.Tensor]) -> None:
    """Copy `values` into the store's buffers, unchecked (constants of another store of the
    same module); returns once host sources may be reused."""
    copy_into(store, values)


__all__ = ["Writer", "commit", "commit_by", "rewrite", "write"]
