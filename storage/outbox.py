"""The delivery outbox: one row per result x destination, sent with retries until delivered or dead.

Rows are written in the same transaction as the job's results (``storage/queue.py``), so a
result is never stored without its deliveries, nor a delivery without its result. A dispatcher
claims a row under a lease (the leased-row mechanism of ``storage/leases.py``), sends it, and
records the outcome here.

    pending ──claim──▶ sending ──▶ delivered
       ▲                  │
       └──── backoff ─────┤ (a failure while attempts remain; a lease that expired)
                          ▼
                        dead ──operator retry──▶ pending
    pending/dead ──their result was superseded──▶ cancelled
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import translate_errors
from storage.events import add_event
from storage.leases import LeasedTable, Leases
from storage.models import Delivery, DeliveryState, Result, utcnow
from storage.retry import Backoff

log = logging.getLogger(__name__)

D = DeliveryState
DELIVERY_MOVES: dict[DeliveryState, frozenset[DeliveryState]] = {
    D.PENDING: frozenset({D.SENDING, D.CANCELLED}),
    D.SENDING: frozenset({D.DELIVERED, D.PENDING, D.DEAD}),
    D.DELIVERED: frozenset(),
    D.DEAD: frozenset({D.PENDING, D.CANCELLED}),
    D.CANCELLED: frozenset({D.PENDING}),
}
DELIVERIES: LeasedTable[Delivery, DeliveryState] = LeasedTable(
    model=Delivery,
    entity="delivery",
    plural="deliveries",
    states=DeliveryState,
    moves=DELIVERY_MOVES,
    ready=D.PENDING,
    running=D.SENDING,
    failed=D.DEAD,  # a destination that refuses for good: nothing to wait for
    dead=D.DEAD,
    retryable=(D.DEAD, D.CANCELLED),
    holder="dispatcher",
    list_command="pacs-triage deliveries list",
    max_error_chars=2000,
)


def move(session: Session, row: Delivery, to: DeliveryState, now: dt.datetime, **detail: object) -> None:
    """Change a delivery's state, refusing moves :data:`DELIVERY_MOVES` does not allow; audit it."""
    DELIVERIES.move(session, row, to, now, **detail)


@dataclass(frozen=True, kw_only=True)
class Destination:
    """Where a result goes: the destination's name in the config and its address, for operators."""

    name: str
    peer: str  # AET@HOST:PORT, mllp://HOST:PORT, a FHIR base URL
    content: str = ""  # what is sent of a result ("sr", "hl7_oru", "fhir"...; "": the object as is)
    sop_classes: frozenset[str] = frozenset()  # results of these SOP classes only; empty: every result


@dataclass(frozen=True, kw_only=True)
class DeliveryView:
    """A delivery as operators and the dispatcher see it."""

    id: int
    result_id: int
    job_id: int
    sop_instance_uid: str
    path: str | None
    destination: str
    peer: str
    content: str
    state: DeliveryState
    attempts: int
    max_attempts: int
    run_after: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Delivery, result: Result) -> DeliveryView:
        return cls(
            id=row.id,
            result_id=row.result_id,
            job_id=result.job_id,
            sop_instance_uid=result.sop_instance_uid,
            path=result.path,
            destination=row.destination,
            peer=row.peer,
            content=row.content,
            state=DeliveryState(row.state),
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            run_after=row.run_after,
            last_status=row.last_status,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
        )

    @classmethod
    def load(cls, session: Session, row: Delivery) -> DeliveryView:
        """The view of ``row``, with its result read in ``session``."""
        return cls.from_row(row, session.get_one(Result, row.result_id))


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery held by one dispatcher under the lease ``owner``."""

    delivery: DeliveryView
    owner: str


def add_deliveries(
    session: Session,
    result: Result,
    destinations: Sequence[Destination],
    *,
    priority: int,
    max_attempts: int,
    now: dt.datetime,
) -> list[Delivery]:
    """Queue ``result`` for every destination that takes its SOP class (in the caller's transaction)."""
    rows = []
    for destination in destinations:
        if destination.sop_classes and result.sop_class_uid not in destination.sop_classes:
            continue
        row = Delivery(
            result_id=result.id,
            destination=destination.name,
            content=destination.content,
            peer=destination.peer[:128],
            priority=priority,
            state=DeliveryState.PENDING,
            attempts=0,
            max_attempts=max_attempts,
            run_after=now,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        rows.append(row)
    session.flush()
    for row in rows:
        add_event(
            session,
            "delivery",
            row.id,
            DeliveryState.PENDING.value,
            result_id=result.id,
            destination=row.destination,
            peer=row.peer,
            **({"content": row.content} if row.content else {}),
        )
    return rows


def cancel_for_job(session: Session, job_id: int, now: dt.datetime, *, reason: str) -> int:
    """Cancel the not-yet-sent deliveries of a job's results (its input was superseded)."""
    rows = session.scalars(
        select(Delivery)
        .join(Result, Result.id == Delivery.result_id)
        .where(Result.job_id == job_id, Delivery.state.in_([DeliveryState.PENDING, DeliveryState.DEAD]))
        .with_for_update()
    ).all()
    for row in rows:
        DELIVERIES.revoke(session, row, D.CANCELLED, now, reason=reason)
    return len(rows)


class Outbox:
    """Claims and settles deliveries. All times come from ``clock`` (UTC)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        lease_seconds: float = 300.0,
        backoff: Backoff | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.leases = Leases(
            sessions,
            DELIVERIES,
            lease_seconds=lease_seconds,
            backoff=backoff or Backoff(base_seconds=10.0, max_seconds=900.0),
            clock=clock,
        )

    def claim(self, worker: str) -> DeliveryClaim | None:
        """The next due delivery, highest priority then oldest, leased to ``worker``; None if none."""
        claimed = self.leases.claim(worker, DeliveryView.load)
        return None if claimed is None else DeliveryClaim(*claimed)

    def heartbeat(self, claim: DeliveryClaim) -> bool:
        """Extend the lease; False when it is no longer ours (reaped)."""
        return self.leases.heartbeat(claim.delivery.id, claim.owner)

    def delivered(self, claim: DeliveryClaim, status: int, *, comment: str = "") -> bool:
        """Record that the destination accepted the object; False when the lease was lost meanwhile."""

        def record(session: Session, row: Delivery, now: dt.datetime) -> bool:
            row.last_status = status
            row.last_error = comment[: DELIVERIES.max_error_chars] or None
            row.delivered_at = now
            detail = {"comment": comment} if comment else {}
            move(session, row, D.DELIVERED, now, status=f"0x{status:04X}", **detail)
            return True

        return self.leases.settle(claim.delivery.id, claim.owner, "recording a delivery", record) or False

    def failed(
        self,
        claim: DeliveryClaim,
        error: str,
        *,
        status: int | None = None,
        permanent: bool = False,
    ) -> DeliveryState | None:
        """Record a failed attempt: back to pending after a backoff, or dead. None: lease was lost."""

        def record(session: Session, row: Delivery, now: dt.datetime) -> DeliveryState:
            row.last_status = status
            detail = {} if status is None else {"status": f"0x{status:04X}"}
            return self.leases.after_failure(session, row, now, error, permanent=permanent, **detail)

        return self.leases.settle(claim.delivery.id, claim.owner, "recording a failed delivery", record)

    def reap(self) -> int:
        """Give expired delivery leases back (their dispatcher died mid-send); returns how many."""
        return self.leases.reap()

    def retry(self, delivery_id: int) -> DeliveryView:
        """Operator: send a dead or cancelled delivery again, with a fresh set of attempts."""
        return self.leases.retry(delivery_id, DeliveryView.load)

    def recent(self, states: Sequence[DeliveryState] = (), limit: int = 50) -> list[DeliveryView]:
        """Deliveries, newest first, optionally only those in ``states``."""
        query = _VIEWS.order_by(Delivery.id.desc()).limit(limit)
        if states:
            query = query.where(Delivery.state.in_(list(states)))
        return self._views(query)

    def for_job(self, job_id: int) -> list[DeliveryView]:
        """The deliveries of a job's results, oldest first."""
        return self._views(_VIEWS.where(Result.job_id == job_id).order_by(Delivery.id))

    def _views(self, query: Select[Delivery, Result]) -> list[DeliveryView]:
        with translate_errors("reading deliveries"), self.sessions() as session:
            return [DeliveryView.from_row(d, r) for d, r in session.execute(query)]


_VIEWS = select(Delivery, Result).join(Result, Result.id == Delivery.result_id)
