"""WeightSync between ranks of one host: the shared send buffer (a memfd on CPU, CUDA IPC on
one GPU), the forced broadcast, groups that mix both, the verdicts every rank raises when
one refuses, and deaths (kill -9) that must leave the others on their old weights and
nothing behind in /dev/shm. Rank 0 trains; the others are replicas. How ranks are spawned
and checked: tests/ranks.py.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import torchrefit
from torchrefit.distributed import WeightSync, segments, verdicts
from torchrefit.errors import WeightSyncError

from helpers import assert_differs
from models import MLP
from ranks import TIMEOUT_S, check, inputs, launch, replica, step, trainer


def memfd_mapped() -> bool:
    """Whether this process maps a WeightSync memfd (the shared path was taken)."""
    return "memfd:torchrefit-weight-sync" in Path("/proc/self/maps").read_text()


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def leaked(before: set[str], pids: list[int]) -> list[str]:
    """Entries of /dev/shm made since `before` by torchrefit or by torch in processes `pids`
    (other processes of this machine may make their own meanwhile)."""
    ours = ("torchrefit", *(f"torch_{pid}_" for pid in pids))
    return sorted(n for n in shm_entries() - before if any(mark in n for mark in ours))


def _make(rank: int, model: Any, compiled: Any, **kwargs: Any) -> WeightSync:
    if rank == 0:
        return WeightSync(weights=model, timeout=TIMEOUT_S, **kwargs)
    return WeightSync(compiled=compiled, timeout=TIMEOUT_S, **kwargs)


def _attempt(sync: WeightSync) -> dict[str, Any]:
    """One sync; what it raised, as data."""
    try:
        sync()
    except WeightSyncError as e:
        return {
            "raised": str(e),
            "refused": sorted(e.refused),
            "applied": e.applied,
            "kept": e.kept,
            "unknown": e.unknown,
        }
    return {"raised": None}


# -- every transport matches eager ----------------------------------------------------------


def transports_match_eager(rank: int, world: int, device: str = "cpu") -> dict[str, Any]:
    """Rank 1: Inductor engines in float32; rank 2: eager bfloat16, double-buffered. Four
    shared syncs (the last two after rehome()), two forced broadcasts, two in a group that
    mixes both (rank 2 asks for broadcasts)."""
    model, optimizer = trainer()
    model.to(device)
    compiled = None
    if rank == 1:
        compiled = replica(1, device, backend="inductor")
    elif rank == 2:
        compiled = replica(2, device, bf16=True, double_buffer=True)
    phases = (
        ("shared", "auto", 4),
        ("collective", "collective", 2),
        ("mixed", "collective" if rank == 2 else "auto", 2),
    )
    routes, errors, mapped, n = {}, {}, {}, 0
    for label, transport, rounds in phases:
        sync = _make(rank, model, compiled, transport=transport)
        routes[label] = [sync.routes.shared, sync.routes.collective]
        for i in range(rounds):
            if label == "shared" and i == 2 and rank == 0:
                sync.rehome()  # parameters become views of the shared buffer
            step(model, optimizer, n)
            n += 1
            x = inputs(device)
            before = compiled(x) if compiled is not None else None
            sync()
            if compiled is not None:
                assert_differs(compiled(x), before)  # the weights really changed
                errors.setdefault(label, []).append(check(compiled, model, device))
        mapped[label] = memfd_mapped()
        del sync  # a replica unmaps the shared memory with its last view
    result: dict[str, Any] = {"routes": routes, "errors": errors, "memfd": mapped}
    if compiled is not None:
        result["engine_dtype"] = str(compiled._torchrefit.store["fc1.weight"].dtype)
    return result


def test_shared_collective_and_mixed_transports_match_eager(tmp_path) -> None:
    results = launch(transports_match_eager, tmp_path)
    assert all("crashed" not in r for r in results), results
    for r in results:
        assert r["routes"] == {
            "shared": [[1, 2], []],
            "collective": [[], [1, 2]],
            "mixed": [[1], [2]],
        }, r["routes"]
        assert r["memfd"]
    for rank in (1, 2):
        assert [len(results[rank]["errors"][k]) for k in ("shared", "collective", "mixed")] == [
            4,
            2,
            2,
        ]
    assert results[1]["engine_dtype"] == "torch.float32"
    assert results[2]["engine_dtype"] == "torch.bfloat16"  # cast on arrival, from the shared view


# -- verdicts ---------------------------------------------------------------------------------


def refusals_reach_every_rank(rank: int, world: int, device: str = "cpu") -> dict[str, Any]:
    """Rank 2 runs bfloat16 engines, rank 1 float32. Over the shared buffer, then by
    broadcast: a value bfloat16 cannot hold (rank 2 refuses, rank 1 applies), NaN (both
    refuse), a source weight of another shape (the source refuses), then a good update."""
    model, optimizer = trainer()
    model.to(device)
    compiled = replica(rank, device, bf16=rank == 2) if rank else None
    outcomes: list[dict[str, Any]] = []
    errors: list[float] = []
    for transport in ("auto", "collective"):
        sync = _make(rank, model, compiled, transport=transport)
        step(model, optimizer, len(outcomes))
        outcomes.append(_attempt(sync))  # good: every replica holds `model`
        held = {r: copy.deepcopy(model) for r in (1, 2)}
        with torch.no_grad():
            model.fc3.bias[0] = 3.4e38  # finite in float32, inf in bfloat16
        outcomes.append(_attempt(sync))
        held[1] = copy.deepcopy(model)
        with torch.no_grad():
            model.fc1.weight[0, 0] = float("nan")
        outcomes.append(_attempt(sync))
        if rank:
            errors.append(check(compiled, held[rank], device))  # the refusals kept the weights
        bias = model.fc3.bias
        model.fc3.bias = torch.nn.Parameter(torch.zeros(5, device=device))
        outcomes.append(_attempt(sync))
        model.fc3.bias = bias
        with torch.no_grad():
            model.fc1.weight[0, 0] = 0.5
            model.fc3.bias[0] = 0.25
        outcomes.append(_attempt(sync))
        if rank:
            errors.append(check(compiled, model, device))  # one good sync: all up to date
    return {"outcomes": outcomes, "errors": errors}


def test_a_refusal_raises_the_same_verdict_on_every_rank(tmp_path) -> None:
    check_refusals(launch(refusals_reach_every_rank, tmp_path))


def check_refusals(results: list[dict[str, Any]]) -> None:
    assert all("crashed" not in r for r in results), results
    for i in range(10):
        seen = [r["outcomes"][i] for r in results]
        assert seen[0] == seen[1] == seen[2], (i, seen)  # the same error on every rank
    for first in (0, 5):
        good, overflow, nan, shape, fixed = results[0]["outcomes"][first : first + 5]
        assert good["raised"] is None and fixed["raised"] is None
        assert overflow["refused"] == [2] and overflow["applied"] == [1], overflow
        assert overflow["kept"] == [2] and "overflows torch.bfloat16" in overflow["raised"]
        assert "rank 2: WeightValueError" in overflow["raised"], overflow
        assert nan["refused"] == [1, 2] and nan["applied"] == [] and nan["kept"] == [1, 2]
        assert "NaN" in nan["raised"], nan
        assert shape["refused"] == [0] and shape["kept"] == [1, 2], shape
        assert "rank 0 (the source)" in shape["raised"] and "fc3.bias" in shape["raised"]
    assert all(len(r["errors"]) == 4 for r in results[1:])


# -- deaths -----------------------------------------------------------------------------------


def source_killed(rank: int, world: int) -> dict[str, Any]:
    """One shared sync from a rehomed trainer; then the source is killed (kill -9) during its
    next optimizer step, which writes into the shared buffer."""
    model, optimizer = trainer()
    compiled = replica(rank) if rank else None
    sync = _make(rank, model, compiled)
    if rank == 0:
        sync.rehome()
    sync()
    if rank == 0:
        step(model, optimizer, 0)
        os.kill(os.getpid(), signal.SIGKILL)
    assert compiled is not None
    check(compiled, model)
    started = time.monotonic()
    outcome = _attempt(sync)
    return {
        **outcome,
        "elapsed": time.monotonic() - started,
        "old_error": check(compiled, model),  # the weights of the one sync that completed
        "memfd": memfd_mapped(),
        "pids": [int(sync.peers[r]["pid"]) for r in range(world)],
    }


def test_a_killed_source_leaves_old_weights_and_no_segment(tmp_path) -> None:
    before = shm_entries()
    results = launch(source_killed, tmp_path)
    assert results[0] == {"exited": True}
    for rank, r in enumerate(results[1:], start=1):
        assert "crashed" not in r, r
        assert r["raised"] is not None and "source (rank 0)" in r["raised"], r
        assert rank in r["kept"] and r["applied"] == [], r
        assert r["elapsed"] < TIMEOUT_S + 5, r
        assert r["memfd"]  # the replicas really mapped the source's memory
    assert leaked(before, results[1]["pids"]) == []  # a memfd has no name: nothing to leak


def replica_killed(rank: int, world: int) -> dict[str, Any]:
    """One good shared sync; then rank 2 is killed (kill -9) and the others sync again."""
    model, optimizer = trainer()
    compiled = replica(rank) if rank else None
    sync = _make(rank, model, compiled)
    sync()
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    old = copy.deepcopy(model)
    step(model, optimizer, 0)
    started = time.monotonic()
    outcome = _attempt(sync)
    outcome["elapsed"] = time.monotonic() - started
    outcome["pids"] = [int(sync.peers[r]["pid"]) for r in range(world)]
    if compiled is not None:
        applied = rank in outcome.get("applied", [])
        outcome["checked"] = check(compiled, model if applied else old)
    return outcome


def test_a_killed_replica_makes_the_others_say_who_applied(tmp_path) -> None:
    before = shm_entries()
    source, survivor, dead = launch(replica_killed, tmp_path)
    assert dead == {"exited": True}
    for r in (source, survivor):
        assert "crashed" not in r, r
        assert r["raised"] is not None and 2 in r["unknown"], r
        assert r["elapsed"] < 2 * TIMEOUT_S + 5, r
    assert "rank 2 died" in source["raised"], source
    # rank 1 knows its own outcome; the source knows it from the host's board, or says unknown
    mine = "applied" if 1 in survivor["applied"] else "kept"
    assert 1 in survivor[mine], survivor
    other = "kept" if mine == "applied" else "applied"
    assert 1 not in source[other], (source, survivor)
    assert leaked(before, source["pids"]) == []


# -- refusals at construction -------------------------------------------------------------------


def cannot_share(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 pretends to run on another host. transport="shared" is refused on every rank;
    so is a replica of another width, and a transport that does not exist. With "auto" the
    group mixes: rank 1 shares, rank 2 gets broadcasts over a subgroup. Then the trainer
    stalls: the replicas raise at their timeout and keep their weights."""
    if rank == 2:
        segments.host_identity = lambda: "elsewhere/0"
    model, optimizer = trainer()
    compiled = replica(rank) if rank else None
    other = torchrefit.compile(MLP(16), (inputs(),), backend="eager") if rank == 2 else compiled
    raised = {}
    cases: dict[str, tuple[Any, str]] = {
        "shared": (compiled, "shared"),
        "width": (other, "shared"),
        "typo": (compiled, "sharde" if rank == 1 else "auto"),
    }
    for case, (module, transport) in cases.items():
        try:
            _make(rank, model, module, transport=transport)
            raised[case] = None
        except torchrefit.TorchRefitError as e:
            raised[case] = [type(e).__name__, str(e)]
    sync = _make(rank, model, compiled)
    step(model, optimizer, 0)
    sync()
    result = {"raised": raised, "routes": [sync.routes.shared, sync.routes.collective]}
    if rank == 0:  # the trainer stalls: every replica's wait ends at its timeout
        time.sleep(TIMEOUT_S + 2)
        return result
    assert compiled is not None
    check(compiled, model)
    step(model, optimizer, 1)  # never sent
    started = time.monotonic()
    stalled = _attempt(sync)
    stalled["elapsed"] = time.monotonic() - started
    step_back, _ = trainer()
    step(step_back, torch.optim.SGD(step_back.parameters(), lr=0.5), 0)
    check(compiled, step_back)  # the weights of the last sync that completed
    return {**result, "stalled": stalled}


def test_ranks_that_cannot_share_are_named_on_every_rank(tmp_path) -> None:
    results = launch(cannot_share, tmp_path)
    assert all("crashed" not in r for r in results), results
    for r in results:
        shared, width, typo = r["raised"]["shared"], r["raised"]["width"], r["raised"]["typo"]
        assert shared[0] == "WeightSyncError" and "rank 2" in shared[1], shared
        assert "another host" in shared[1], shared
        assert width[0] == "IncompatibleWeightsError" and "rank 2" in width[1], width
        assert "fc1.weight" in width[1], width
        assert typo[0] == "TorchRefitError" and "rank 1" in typo[1] and "'sharde'" in typo[1]
        assert r["routes"] == [[1], [2]], r["routes"]
    for rank in (1, 2):
        stalled = results[rank]["stalled"]
        assert stalled["raised"] is not None and "source (rank 0)" in stalled["raised"]
        assert rank in stalled["kept"] and stalled["applied"] == [], stalled
        assert TIMEOUT_S - 0.5 < stalled["elapsed"] < TIMEOUT_S + 5, stalled


# -- in one process ------------------------------------------------------------------------------


def test_a_segment_opens_read_only_and_only_with_its_token() -> None:
    segment = segments.Segment(world=3, data_bytes=segments.PAGE)
    assert segment.data is not None
    segment.data[100:104] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    opened = segments.open_offer(segment.offer(), 3)
    assert opened.data is not None and opened.data[100:104].tolist() == [1, 2, 3, 4]
    opened.board.mark(2, 7, segments.DONE_APPLIED)
    assert segment.board.read(2) == (7, segments.DONE_APPLIED)  # one memory, two mappings
    forged = {**segment.offer(), "token": "00" * segments.TOKEN_BYTES}
    with pytest.raises(segments.Unavailable, match="token"):
        segments.open_offer(forged, 3)
    segment.close_fd()
    assert not any("torchrefit" in name for name in shm_entries())


def test_verdict_messages_name_ranks_and_outcomes() -> None:
    gathered = [
        verdicts.Verdict(0, "source", verdicts.SENT),
        verdicts.Verdict(1, "replica", verdicts.APPLIED),
        verdicts.Verdict(2, "replica", verdicts.REFUSED, "WeightValueError: 'w' holds NaN"),
    ]
    error = verdicts.refusal(gathered, 3, src=0)
    assert error is not None and error.refused == {2: "WeightValueError: 'w' holds NaN"}
    assert error.applied == [1] and error.kept == [2] and error.version == 3
    assert "refused by rank 2: WeightValueError" in str(error)
    assert "Rank 1 applied it; rank 2 kept its previous weights." in str(error)
    assert verdicts.refusal(gathered[:2], 3, src=0) is None
    failed = verdicts.failure("the verdict exchange failed", 0, 4, {1: "applied", 2: "died"}, 0, "")
    assert "rank 0 (the source)" in str(failed) and failed.unknown == [2]
    assert "Rank 1 applied the update; rank 2 died" in str(failed)


# -- one GPU, three processes --------------------------------------------------------------------


def _gpu0(rank: int) -> int:
    return 0


def cuda_transports(rank: int, world: int) -> dict[str, Any]:
    return transports_match_eager(rank, world, device="cuda:0")


@pytest.mark.gpu
def test_cuda_ipc_on_one_gpu_matches_eager(tmp_path) -> None:
    """Every rank on cuda:0 (a Gloo group for control): the replicas open the trainer's
    buffer through CUDA IPC; rank 2's broadcasts (mixed phase) go through Gloo."""
    results = launch(cuda_transports, tmp_path, device_of=_gpu0)
    assert all("crashed" not in r for r in results), results
    for r in results:
        assert r["routes"]["shared"] == [[1, 2], []], r["routes"]
    for rank in (1, 2):
        assert len(results[rank]["errors"]["shared"]) == 4
    assert results[2]["engine_dtype"] == "torch.bfloat16"


def cuda_refusals(rank: int, world: int) -> dict[str, Any]:
    return refusals_reach_every_rank(rank, world, device="cuda:0")


@pytest.mark.gpu
def test_cuda_ipc_refusals_raise_the_same_verdict_on_every_rank(tmp_path) -> None:
    check_refusals(launch(cuda_refusals, tmp_path, device_of=_gpu0))
