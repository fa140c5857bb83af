"""What each rank did with one update, and the error every rank raises when one refused.

After every sync each rank states its verdict (the source: sent, or refused with why; a
replica: applied, refused with why, or kept because the source refused), and the ranks
gather all of them. Any refusal makes every rank raise the same WeightSyncError, naming the
refusing rank(s) and reason(s) and saying which replicas applied the update and which kept
their previous weights (a refit is all or nothing, so a replica that refused kept them).

When the gathering itself fails (a rank died or stalled), a rank says what it knows: its
own outcome, and what the replicas of its host wrote on the shared board.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import WeightSyncError

MESSAGE_BYTES = 1024  # one rank's verdict on the wire, as JSON (its reason is cut to fit)

SENT, APPLIED, REFUSED, KEPT = "sent", "applied", "refused", "kept"
DIED, UNKNOWN = "died", "unknown"


@dataclass(frozen=True)
class Verdict:
    rank: int
    role: str  # "source" or "replica"
    outcome: str  # SENT, APPLIED, REFUSED or KEPT
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """As data that fits MESSAGE_BYTES once JSON-encoded (a long reason is cut)."""
        reason = self.reason
        while True:
            data = {"rank": self.rank, "role": self.role, "outcome": self.outcome, "reason": reason}
            if len(json.dumps(data)) <= MESSAGE_BYTES or not reason:
                return data
            reason = reason[: len(reason) // 2] + "..." if len(reason) > 8 else ""

    @staticmethod
    def from_json(data: dict[str, Any]) -> Verdict:
        return Verdict(int(data["rank"]), str(data["role"]), str(data["outcome"]), data["reason"])


def refusal(verdicts: list[Verdict], version: int, src: int) -> WeightSyncError | None:
    """The error every rank raises when some rank refused update `version`; None if none did."""
    refused = {v.rank: v.reason for v in verdicts if v.outcome == REFUSED}
    if not refused:
        return None
    replicas = [v for v in verdicts if v.role == "replica"]
    applied = [v.rank for v in replicas if v.outcome == APPLIED]
    kept = [v.rank for v in replicas if v.outcome != APPLIED]
    by_reason: dict[str, list[int]] = {}
    for rank, why in sorted(refused.items()):
        by_reason.setdefault(why.rstrip(". "), []).append(rank)
    who = "; ".join(f"{_label(ranks, src)}: {why}" for why, ranks in by_reason.items())
    outcome = _sentence(
        [
            _ranks(applied, "applied it") or "no replica applied it",
            _ranks(kept, "kept {its} previous weights") or "no replica kept its previous weights",
        ]
    )
    message = (
        f"WeightSync update {version} was refused by {who}. {outcome}Every rank of the group "
        "raises this error and the group stays usable: fix what was refused and sync again "
        "(one successful sync brings every replica up to date)."
    )
    return WeightSyncError(
        message, refused=refused, applied=applied, kept=kept, unknown=[], version=version
    )


def failure(
    what: str,
    rank: int,
    version: int,
    outcomes: dict[int, str],
    src: int,
    then: str,
) -> WeightSyncError:
    """The error of a rank whose collective failed: `outcomes` maps each replica rank to
    what this rank knows of it (APPLIED, KEPT, DIED or UNKNOWN)."""
    applied = sorted(r for r, o in outcomes.items() if o == APPLIED)
    kept = sorted(r for r, o in outcomes.items() if o == KEPT)
    died = sorted(r for r, o in outcomes.items() if o == DIED)
    unknown = sorted(r for r, o in outcomes.items() if o in (UNKNOWN, DIED))
    known = _sentence(
        [
            _ranks(applied, "applied the update"),
            _ranks(kept, "kept {its} previous weights"),
            _ranks(died, "died (the process is gone)"),
            _ranks(
                [r for r in unknown if r not in died],
                "may or may not have applied it (this rank cannot tell)",
            ),
        ]
    )
    where = f"WeightSync update {version} failed on {_rank(rank, src)}"
    message = f"{where}: {what.rstrip('. ')}. {known}{then}"
    return WeightSyncError(message, applied=applied, kept=kept, unknown=unknown, version=version)


def _label(ranks: list[int], src: int) -> str:
    if len(ranks) == 1:
        return _rank(ranks[0], src)
    return f"ranks {', '.join(str(r) for r in ranks)}"


def _rank(rank: int, src: int) -> str:
    return f"rank {rank} (the source)" if rank == src else f"rank {rank}"


def _ranks(ranks: list[int], verb: str) -> str:
    """'rank 1 <verb>' or 'ranks 1, 2 <verb>' ({its}: its or their); "" for no rank."""
    if not ranks:
        return ""
    if len(ranks) == 1:
        return f"rank {ranks[0]} {verb.format(its='its')}"
    return f"ranks {', '.join(str(r) for r in ranks)} {verb.format(its='their')}"


def _sentence(parts: list[str]) -> str:
    """Clauses joined into one sentence (with a trailing space), or "" if all are empty."""
    text = "; ".join(p for p in parts if p)
    return f"{text[:1].upper()}{text[1:]}. " if text else ""
