"""WeightSync: one trainer refits many compiled replicas over torch.distributed.

Every rank of a group makes one `WeightSync` and calls it once per update. The source rank
packs the trainer's current values into one flat send buffer per dtype (no copy for
parameters `rehome()` moved there). Replicas on the source's host (and GPU) share that
buffer: host memory in a memfd, or a CUDA allocation opened once through CUDA IPC; the
others receive it by one broadcast per buffer into a standby copy beside their engines.
Each replica then refits from views of its buffer through the core stages (evaluate,
validate, commit), so the cast to the engine dtype runs once, on the receiving side, and
nothing is written into an engine before the whole update has arrived and validated.

Each sync is three steps over the group: the source's signal (the update's number, or
that the source refused), the payload, and a verdict from every rank; a refusal anywhere
makes every rank raise the same WeightSyncError. Layouts, offers and verdicts travel as
JSON bytes in uint8 tensors: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist

from ..errors import IncompatibleWeightsError, TorchRefitError, WeightSyncError
from ..export import WeightSpec, parse_dtype
from ..module import CompiledModule, RefitState
from ..refit import refittable
from ..refit.commit import commit
from ..refit.evaluate import evaluate, validate
from ..refit.match import Matched, fast
from ..refit.read import NewWeights
from . import cuda_ipc, segments
from .control import Control, GroupFailure, Laps, Timeout, comm_device, resolve_timeout
from .layout import (
    Layout,
    canonical,
    check_replica,
    check_source,
    full_tensors,
    pack,
    plain_tensors,
    plan,
    reference_of,
    rehome,
    source_tensors,
    spec_map,
    usage,
    views,
)
from .transports import (
    TRANSPORTS,
    Routes,
    SharedReceive,
    SharedSend,
    data_group,
    share_reasons,
    where,
)
from .verdicts import APPLIED, DIED, KEPT, MESSAGE_BYTES, REFUSED, SENT, UNKNOWN, Verdict
from .verdicts import failure as failure_error
from .verdicts import refusal as refusal_error

logger = logging.getLogger("torchrefit")

_SETTLED = {segments.DONE_APPLIED: APPLIED, segments.DONE_REFUSED: KEPT, 0: DIED, -1: UNKNOWN}
_REMAKE = (
    "A rank may have died or stalled: make a new process group and a WeightSync on every rank."
)


class WeightSync:
    """`WeightSync(compiled=..., weights=..., src=0)()` moves the source's weights into
    every replica, then an all-or-nothing refit on each replica.

    The source rank (`src`, a global rank) passes `weights` (an nn.Module or a state_dict,
    DTensors allowed); every other rank of `group` passes `compiled`, a module that
    torchrefit compiled or loaded. `transport`: "auto" (replicas on the source's host, and
    GPU for GPU weights, share its send buffer; the others get broadcasts), "collective"
    (broadcast to this rank; on the source, to every rank) or "shared" (every replica must
    share, else every rank refuses at construction). `timeout` (a timedelta or seconds;
    default: the group's) bounds each wait of a sync: a rank that dies or stalls makes the
    others raise WeightSyncError. Construction waits for every rank (replicas may still be
    compiling) up to the group's own timeout.
    """

    def __init__(
        self,
        compiled: CompiledModule | None = None,
        weights: Any = None,
        src: int = 0,
        group: dist.ProcessGroup | None = None,
        timeout: Timeout = None,
        transport: str = "auto",
    ) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.src, self.rank = src, dist.get_rank()
        self.is_source = self.rank == src
        self.device = comm_device(self.group)
        self.timeout = resolve_timeout(timeout, self.group, self.device)
        # construction is a rendezvous (replicas may still be compiling): the group's timeout
        self._setup_timeout = resolve_timeout(None, self.group, self.device)
        self.control = Control(self.group, self.device)
        self.ranks = dist.get_process_group_ranks(self.group)
        self.compiled, self.weights, self.transport = compiled, weights, transport
        self.state: RefitState | None = None
        self.matched: Matched | None = None
        self.version = 0  # updates synced so far
        self.timings: dict[str, float] = {}  # the last sync's stages, in ms
        self.shared_send: SharedSend | None = None
        self.shared: SharedReceive | None = None
        self.stream: Any = None  # a CUDA replica's refit stream
        self._outcome = KEPT  # this replica's weights in the current update: APPLIED or KEPT
        self._signal = f"the signal from the source (rank {src})"
        if src not in self.ranks:
            raise TorchRefitError(
                f"WeightSync got src={src}, which is not a rank of the group {self.ranks}; src "
                "is a global rank."
            )
        self._described = self._describe()
        described = self._agree(self._described, "the layout exchange")
        reference, names = self._exchange(described)
        self.specs = [WeightSpec.from_json(s) for s in reference["specs"]]
        self.spec_map = {s.fqn: s for s in self.specs}
        self.aliases: dict[str, str] = dict(reference["aliases"])
        self.layout = plan(self.specs, names)
        self.peers = {d["rank"]: d for d in described}
        self.routes = self._connect(described)
        self.data_group = data_group(self.group, src, self.routes, self.rank)
        logger.info(
            "weight sync bound: %d weights, %.1f MB in %d buffer(s); shared with ranks %s, "
            "broadcast to ranks %s",
            len(names),
            self.layout.nbytes() / 1e6,
            len(self.buffers),
            self.routes.shared,
            self.routes.collective,
        )

    def _exchange(self, described: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
        """The reference replica's description and the names the source sends, once every
        rank has accepted them (else every rank raises, naming the rank and the weight)."""
        reference = reference_of(described)
        error = self._check(reference)
        names = self._names(reference) if not error else None
        checked = self._agree({"error": error, "names": names}, "the layout check")
        return reference, next(c["names"] for c in checked if c["names"] is not None)

    def _connect(self, described: list[dict[str, Any]]) -> Routes:
        """The send or receive buffers: shared where a replica can open the source's, its
        own otherwise; the refit bound over them; the routes agreed by every rank."""
        reasons = share_reasons(described, self.src, self.device)
        offer = self._offer(reasons) if any(not r for r in reasons.values()) else None
        why_not = reasons.get(self.rank, "")
        if self.is_source:
            shared = self.shared_send
            self.buffers = shared.buffers if shared is not None else self._own_buffers()
        else:
            if not why_not:
                why_not = self._open(offer)
            shared_buffers = self.shared.buffers if self.shared is not None else None
            self.buffers = shared_buffers or self._own_buffers()
            if self.state is not None and self.state.store.device.type == "cuda":
                self.stream = torch.cuda.Stream(self.state.store.device)
        self.views = views(self.buffers, self.layout)
        agreed = self._agree(
            {"error": self._bind(), "digest": self.layout.digest(), "why_not": why_not},
            "the layout agreement",
        )
        if len({d["digest"] for d in agreed}) != 1:
            raise WeightSyncError(
                "The ranks computed different wire layouts from one exchange; run one torchrefit "
                "version on every rank."
            )
        if self.shared_send is not None:
            self.shared_send.segment.close_fd()  # every replica has opened it, or given up
        return self._routes(agreed, described)

    def _offer(self, reasons: dict[int, str]) -> dict[str, Any] | None:
        """The source makes its shared send buffer and offers it (as data) to the ranks
        that may share; None (every rank knows why) when it could not."""
        payload: dict[str, Any] = {"error": "", "offer": None, "why": ""}
        if self.is_source:
            try:
                device = self._source_device()
                self.shared_send = SharedSend.make(self.layout, device, len(self.ranks))
                payload["offer"] = self.shared_send.offer()
            except (segments.Unavailable, cuda_ipc.Unavailable, RuntimeError) as e:
                payload["why"] = f"the source could not share its buffer: {e}"
        gathered = self._agree(payload, "the shared-memory offer")
        source = gathered[self.ranks.index(self.src)]
        for rank, why in reasons.items():
            if not why and source["why"]:
                reasons[rank] = source["why"]
        return source["offer"]

    def _open(self, offer: dict[str, Any] | None) -> str:
        """A replica maps the source's shared buffer; "" or why it could not."""
        if offer is None or self.state is None:
            return "the source made no shared buffer"
        try:
            self.shared = SharedReceive.open(
                offer, self.layout, len(self.ranks), self.state.store.device
            )
        except (segments.Unavailable, cuda_ipc.Unavailable, RuntimeError) as e:
            return f"rank {self.rank} could not open the source's shared buffer: {e}"
        return ""

    def _routes(self, agreed: list[dict[str, Any]], described: list[dict[str, Any]]) -> Routes:
        """Who shares and who gets broadcasts; with transport="shared" on any rank, every
        rank raises if some replica cannot share."""
        routes = Routes()
        for d, a in zip(described, agreed, strict=True):
            if d["role"] != "replica":
                continue
            if a["why_not"]:
                routes.collective.append(d["rank"])
                routes.reasons[d["rank"]] = a["why_not"]
            else:
                routes.shared.append(d["rank"])
        strict = [d["rank"] for d in described if d["transport"] == "shared"]
        if strict and routes.collective:
            why = "; ".join(f"rank {r}: {routes.reasons[r]}" for r in routes.collective)
            raise WeightSyncError(
                f"WeightSync(transport='shared') on rank(s) {strict}, but some replicas cannot "
                f"share the source's buffer ({why}). Run those replicas on the source's host "
                "(and GPU), or pass transport='auto' on every rank to broadcast to them."
            )
        for rank, why in routes.reasons.items():
            logger.info("weight sync: rank %d gets broadcasts: %s", rank, why)
        return routes

    def __call__(self) -> None:
        """One update: the source's current values into every replica's engines. Every rank
        raises the same WeightSyncError if any rank refused it; a rank that cannot hear from
        another (dead or stalled) raises within the timeout, saying what it knows."""
        self.version += 1
        self._outcome = KEPT  # this replica's weights, until a refit commits
        laps = Laps()
        try:
            verdicts, cause = self._send(laps) if self.is_source else self._receive(laps)
        except GroupFailure as e:
            raise failure_error(
                str(e), self.rank, self.version, self._outcomes(), self.src, _REMAKE
            ) from e
        finally:
            self._mark_done()
        self.timings = laps.done()
        logger.debug("weight sync %d on rank %d: %s ms", self.version, self.rank, self.timings)
        error = refusal_error(verdicts, self.version, self.src)
        if error is not None:
            raise error from cause

    def _send(self, laps: Laps) -> tuple[list[Verdict], Exception | None]:
        """The source: pack, signal, broadcast to the replicas that do not share, verdicts."""
        reason, cause = "", None
        try:
            self._pack()
            if self.shared_send is not None:
                self.shared_send.publish()
        except Exception as e:  # noqa: BLE001 - every rank learns of it through the verdicts
            reason, cause = f"{type(e).__name__}: {e}", e
        laps("pack")
        self.control.signal([self.version, int(not reason)], self.src, self._signal, self.timeout)
        if not reason and self.data_group is not None:
            self._broadcast()
        laps("transfer")
        outcome = REFUSED if reason else SENT
        verdicts = self._verdicts(Verdict(self.rank, "source", outcome, reason))
        laps("verdict")
        return verdicts, cause

    def _receive(self, laps: Laps) -> tuple[list[Verdict], Exception | None]:
        """A replica: the signal, the payload (broadcast, or the shared buffer's event),
        the refit, verdicts."""
        version, go = self.control.signal([0, 0], self.src, self._signal, self.timeout)
        laps("signal")
        outcome, reason, cause = KEPT, "", None
        if go:
            with self._refit_stream():
                if self.data_group is not None:
                    self._broadcast()
                if self.shared is not None:
                    self.shared.wait(self.stream)
                laps("transfer")
                if version == self.version:
                    outcome, reason, cause = self._refit()
                laps("refit")
        if version != self.version:
            outcome = REFUSED
            reason = (
                f"rank {self.rank} expected update {self.version} but the source sent update "
                f"{version}; call sync() once per update on every rank"
            )
            self.version = version
        self._mark_done()  # before the verdicts: the source may wait for it if they fail
        verdicts = self._verdicts(Verdict(self.rank, "replica", outcome, reason))
        laps("verdict")
        return verdicts, cause

    def _refit(self) -> tuple[str, str, Exception | None]:
        """The core stages over views of the received buffer; on CUDA, returns once every
        read of the buffer is done. (APPLIED or REFUSED, why, the exception)."""
        assert self.matched is not None and self.state is not None and self.compiled is not None
        try:
            with self.state.guard.refit:  # refits of one module run one at a time
                values = evaluate(self.matched, self.state)
                validate(values, self.state)
                commit(self.compiled, values, in_place=True)
        except Exception as e:  # noqa: BLE001 - a refusal: the refit wrote nothing
            return REFUSED, f"{type(e).__name__}: {e}", e
        finally:
            if self.stream is not None:
                self.stream.synchronize()
        self._outcome = APPLIED
        return APPLIED, "", None

    def _refit_stream(self) -> Any:
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _broadcast(self) -> None:
        works = [
            dist.broadcast(buf, src=self.src, group=self.data_group, async_op=True)
            for buf in self.buffers.values()
        ]
        self.control.wait(works, "the weight broadcast", self.timeout)

    def _verdicts(self, own: Verdict) -> list[Verdict]:
        gathered = self.control.gather_fixed(
            own.to_json(), MESSAGE_BYTES, "the verdict exchange", self.timeout
        )
        return [Verdict.from_json(g) for g in gathered]

    def _mark_done(self) -> None:
        """A sharing replica, done with this update (applied, refused or failed): it reads
        the source's buffer no more until the next signal. The board says so to its host."""
        if self.shared is not None:
            how = segments.DONE_APPLIED if self._outcome == APPLIED else segments.DONE_REFUSED
            self.shared.opened.board.mark(self.ranks.index(self.rank), self.version, how)

    def _outcomes(self) -> dict[int, str]:
        """After a failed collective: what this rank knows of each replica's outcome. The
        source waits (up to the timeout) for the replicas sharing its buffer to finish
        reading it, so that the trainer's next step cannot tear a read."""
        replicas = [r for r in self.ranks if self.peers[r]["role"] == "replica"]
        known = dict.fromkeys(replicas, UNKNOWN)
        if not self.is_source:
            known[self.rank] = self._outcome
        board = self._board()
        if board is None:
            return known
        deadline = time.monotonic() + (self.timeout.total_seconds() if self.is_source else 0.0)
        for rank in self.routes.shared:
            if rank != self.rank:
                index, pid = self.ranks.index(rank), int(self.peers[rank]["pid"])
                known[rank] = _SETTLED[board.settle(index, pid, self.version, deadline)]
        return known

    def _board(self) -> segments.Board | None:
        if self.shared_send is not None:
            return self.shared_send.segment.board
        return self.shared.opened.board if self.shared is not None else None

    def rehome(self) -> None:
        """Source only: move the trainer's parameters and buffers into the send buffers
        (`tensor.data = view`), so a sync copies nothing before sending. Call after moving
        the model to its device and dtype, before building the optimizer (fused optimizers
        may cache addresses)."""
        if not self.is_source or not isinstance(self.weights, torch.nn.Module):
            raise TorchRefitError(
                "rehome() moves an nn.Module's tensors; call it on the source rank of a module."
            )
        rehome(self.weights, self.spec_map, self.aliases, self.views)

    def _describe(self) -> dict[str, Any]:
        """What this rank holds and where it runs, as JSON-able data."""
        role = "source" if self.is_source else "replica"
        if self.transport not in TRANSPORTS:
            message = f"transport={self.transport!r}; expected one of {list(TRANSPORTS)}"
            return {"rank": self.rank, "role": role, "error": usage(self.rank, message)}
        base = {"rank": self.rank, "role": role, "transport": self.transport, "error": ""}
        if self.is_source:
            if self.weights is None:
                message = "the source rank needs weights= (an nn.Module or a state_dict)"
                return {**base, "error": usage(self.rank, message)}
            return {**base, **where(self._source_device())}
        try:
            self.state = refittable(self.compiled)
        except TorchRefitError as e:
            return {**base, "error": usage(self.rank, str(e))}
        if self.state.store.device != self.device and self.device.type == "cuda":
            message = (
                f"the engines are on {self.state.store.device} but NCCL sends to {self.device}; "
                "call torch.cuda.set_device(local_rank) before compiling"
            )
            return {**base, "error": usage(self.rank, message)}
        return {
            **base,
            **where(self.state.store.device),
            "structure": hashlib.sha256("\n".join(self.state.structure).encode()).hexdigest(),
            "specs": [s.to_json() for s in self.state.specs.values()],
            "aliases": self.state.aliases,
        }

    def _source_device(self) -> torch.device:
        """Where the source's weights are (its first tensor's device)."""
        try:
            tensors = plain_tensors(self.weights)
        except TorchRefitError:
            return torch.device("cpu")
        return next((t.device for t in tensors.values()), torch.device("cpu"))

    def _check(self, reference: dict[str, Any]) -> str:
        """This rank's disagreement with the reference replica, or ""."""
        if self.is_source:
            return check_source(self.rank, self.weights, reference)
        return check_replica(self.rank, self._described, reference)

    def _names(self, reference: dict[str, Any]) -> list[str] | None:
        """The weights the source sends (canonical FQNs: a tied weight once); None on replicas."""
        if not self.is_source:
            return None
        aliases = reference["aliases"]
        given = {canonical(n, aliases) for n in source_tensors(self.weights, spec_map(reference))}
        return [
            s["fqn"] for s in reference["specs"] if s["fqn"] in given and s["fqn"] not in aliases
        ]

    def _own_buffers(self) -> dict[str, torch.Tensor]:
        """Send or receive buffers of this rank's own, on the group's collective device."""
        return {
            d: torch.empty(max(n, 1), dtype=parse_dtype(d), device=self.device)
            for d, n in self.layout.sizes.items()
        }

    def _bind(self) -> str:
        """Replicas: the refit core's match stage, once, over views of the buffer received."""
        if self.is_source or self.state is None:
            return ""
        try:
            self.matched = fast(NewWeights(dict(self.views), "state_dict"), self.state)
        except TorchRefitError as e:
            return f"rank {self.rank}: {e}"
        return ""

    def _pack(self) -> None:
        """The source's current values into the send buffers: one batched copy per device."""
        pack(source_tensors(self.weights, self.spec_map), self.aliases, self.views)

    def _agree(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """Every rank's payload, in group rank order; raises on every rank if any rank erred."""
        try:
            gathered = self.control.gather_json(payload, what, self._setup_timeout)
        except GroupFailure as e:
            raise WeightSyncError(f"{e} on rank {self.rank}. {_REMAKE}") from e
        errors = [p for p in gathered if p.get("error")]
        if errors:
            messages = "; ".join(p["error"] for p in errors)
            usage_only = all(p["error"].startswith("usage: ") for p in errors)
            kind = TorchRefitError if usage_only else IncompatibleWeightsError
            raise kind(f"WeightSync refused during {what}: {messages}")
        return gathered


def gather_shards(weights: Any) -> None:
    """On a trainer rank that holds DTensor shards but is not the source: take part in
    gathering the full weights. Call it once per sync, while the source calls its sync()."""
    for _ in full_tensors(plain_tensors(weights)):
        pass


__all__ = ["Layout", "WeightSync", "gather_shards"]
