"""The delivery outbox: one row per result x destination, sent with retries until delivered or dead.

Rows are written in the same transaction as the job's results (``storage/queue.py``), so a
result is never stored without its deliveries, nor a delivery without its result. A dispatcher
claims a row under a lease (``storage/leases.py``), sends it, and records the outcome here.

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

from storage import leases
from storage.db import transaction, translate_errors
from storage.errors import InvalidTransition, NotFound
from storage.ingest import add_event
from storage.models import Delivery, DeliveryState, Result, utcnow
from storage.retry import Backoff, exhausted

log = logging.getLogger(__name__)

D = DeliveryState
DELIVERY_MOVES: dict[DeliveryState, frozenset[DeliveryState]] = {
    D.PENDING: frozenset({D.SENDING, D.CANCELLED}),
    D.SENDING: frozenset({D.DELIVERED, D.PENDING, D.DEAD}),
    D.DELIVERED: frozenset(),
    D.DEAD: frozenset({D.PENDING, D.CANCELLED}),
    D.CANCELLED: frozenset({D.PENDING}),
}
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True, kw_only=True)
class Destination:
    """Where a result goes: the destination's name in the config and its address, for operators."""

    name: str
    peer: str  # AET@HOST:PORT


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
            state=DeliveryState(row.state),
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            run_after=row.run_after,
            last_status=row.last_status,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
        )


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery held by one dispatcher under the lease ``owner``."""

    delivery: DeliveryView
    owner: str


def move(session: Session, row: Delivery, to: DeliveryState, now: dt.datetime, **detail: object) -> None:
    """Change a delivery's state, refusing moves the state machine does not allow; audit it."""
    current = DeliveryState(row.state)
    if to not in DELIVERY_MOVES[current]:
        allowed = ", ".join(sorted(DELIVERY_MOVES[current])) or "none (final state)"
        raise InvalidTransition(
            f"delivery {row.id} is {current.value}; it cannot become {to.value} (allowed: {allowed})"
        )
    row.state = to
    row.updated_at = now
    add_event(session, "delivery", row.id, to.value, previous=current.value, **detail)


def add_deliveries(
    session: Session,
    result: Result,
    destinations: Sequence[Destination],
    *,
    priority: int,
    max_attempts: int,
    now: dt.datetime,
) -> list[Delivery]:
    """Queue ``result`` for every destination (in the caller's transaction)."""
    rows = []
    for destination in destinations:
        row = Delivery(
            result_id=result.id,
            destination=destination.name,
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
        leases.clear_lease(row)
        move(session, row, DeliveryState.CANCELLED, now, reason=reason)
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
        self.lease_seconds = lease_seconds
        self.backoff = backoff or Backoff(base_seconds=10.0, max_seconds=900.0)
        self.clock = clock

    def claim(self, worker: str) -> DeliveryClaim | None:
        """The next due delivery, highest priority then oldest, leased to ``worker``; None if none."""
        owner = leases.new_owner(worker)
        now = self.clock()
        with transaction(self.sessions, "claiming a delivery") as session:
            row_id = leases.claim_next(
                session,
                Delivery,
                ready=DeliveryState.PENDING,
                running=DeliveryState.SENDING,
                owner=owner,
                now=now,
                lease_seconds=self.lease_seconds,
            )
            if row_id is None:
                return None
            row, result = session.execute(
                select(Delivery, Result)
                .join(Result, Result.id == Delivery.result_id)
                .where(Delivery.id == row_id)
            ).one()
            add_event(
                session,
                "delivery",
                row.id,
                DeliveryState.SENDING.value,
                previous=DeliveryState.PENDING.value,
                attempt=row.attempts,
                owner=owner,
            )
            return DeliveryClaim(DeliveryView.from_row(row, result), owner)

    def heartbeat(self, claim: DeliveryClaim) -> bool:
        with transaction(self.sessions, "extending a delivery lease") as session:
            return leases.extend(
                session,
                Delivery,
                claim.delivery.id,
                owner=claim.owner,
                running=DeliveryState.SENDING,
                now=self.clock(),
                lease_seconds=self.lease_seconds,
            )

    def delivered(self, claim: DeliveryClaim, status: int, *, comment: str = "") -> bool:
        """Record that the destination accepted the object; False when the lease was lost meanwhile."""
        now = self.clock()
        with transaction(self.sessions, "recording a delivery") as session:
            row = leases.take(
                session, Delivery, claim.delivery.id, owner=claim.owner, running=DeliveryState.SENDING
            )
            if row is None:
                return False
            leases.clear_lease(row)
            row.last_status = status
            row.last_error = comment[:MAX_ERROR_CHARS] or None
            row.delivered_at = now
            move(
                session,
                row,
                DeliveryState.DELIVERED,
                now,
                status=f"0x{status:04X}",
                **({"comment": comment} if comment else {}),
            )
            return True

    def failed(
        self,
        claim: DeliveryClaim,
        error: str,
        *,
        status: int | None = None,
        permanent: bool = False,
    ) -> DeliveryState | None:
        """Record a failed attempt: back to pending after a backoff, or dead. None: lease was lost."""
        now = self.clock()
        with transaction(self.sessions, "recording a failed delivery") as session:
            row = leases.take(
                session, Delivery, claim.delivery.id, owner=claim.owner, running=DeliveryState.SENDING
            )
            if row is None:
                return None
            leases.clear_lease(row)
            row.last_status = status
            row.last_error = error[:MAX_ERROR_CHARS]
            detail: dict[str, object] = {"attempt": row.attempts, "error": error[:300]}
            if status is not None:
                detail["status"] = f"0x{status:04X}"
            delay = None if permanent else leases.schedule_retry(row, self.backoff, now)
            if delay is None:
                move(session, row, DeliveryState.DEAD, now, **detail)
                return DeliveryState.DEAD
            move(session, row, DeliveryState.PENDING, now, retry_in_seconds=round(delay, 3), **detail)
            return DeliveryState.PENDING

    def reap(self) -> int:
        """Give expired delivery leases back (their dispatcher died mid-send); returns how many."""
        now = self.clock()
        with transaction(self.sessions, "reaping delivery leases") as session:
            ids = leases.expired(session, Delivery, running=DeliveryState.SENDING, now=now)
            for row_id in ids:
                row = session.get_one(Delivery, row_id)
                leases.clear_lease(row)
                reason = "lease expired: the dispatcher died or hung while sending"
                if exhausted(row.attempts, row.max_attempts):
                    move(session, row, DeliveryState.DEAD, now, reason=reason, attempt=row.attempts)
                else:
                    row.run_after = now
                    move(session, row, DeliveryState.PENDING, now, reason=reason, attempt=row.attempts)
            return len(ids)

    def retry(self, delivery_id: int) -> DeliveryView:
        """Operator: send a dead or cancelled delivery again, with a fresh set of attempts."""
        now = self.clock()
        with transaction(self.sessions, "retrying a delivery") as session:
            row = session.get(Delivery, delivery_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no delivery {delivery_id}; see `pacs-triage deliveries list`")
            row.attempts = 0
            row.run_after = now
            move(session, row, DeliveryState.PENDING, now, reason="retried by operator")
            return DeliveryView.from_row(row, session.get_one(Result, row.result_id))

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
