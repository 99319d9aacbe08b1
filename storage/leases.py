"""Leased rows: the one mechanism under the job queue and the delivery outbox.

A leased table's rows wait in a *ready* state, are claimed one at a time under a lease into a
*running* state, and are settled by their holder: done, back to ready after a backoff, failed, or
dead when the attempts are used up. A reaper takes back leases whose holder died or hung. What
is specific to a table (its view types, what success writes, its extra columns) stays in its
module: ``storage/queue.py`` (jobs) and ``storage/outbox.py`` (deliveries).

A lease owner is a token unique to one claim (``<worker>/<random>``), so a holder whose lease
expired and was handed to another can never finish, extend or release the new holder's claim:
every write after the claim is a compare-and-set on ``(id, lease_owner, state)``.

Claiming, one API on both backends:

* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` picks a row no other transaction holds, so
  many workers claim in parallel without waiting on each other.
* SQLite: every transaction starts with ``BEGIN IMMEDIATE`` (``storage/db.py``), so a claim holds
  the single write lock from its first read; the ``UPDATE ... WHERE state = <ready>`` that follows
  is a compare-and-set that would refuse a row someone else moved. (SQLAlchemy renders no
  ``FOR UPDATE`` on SQLite.)

Every state change goes through :meth:`LeasedTable.move`, which checks it against the table's
moves and appends its audit row (``storage/events.py``) in the same transaction; only the claim
moves a row by a compare-and-set ``UPDATE``, and it appends the same audit row.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction
from storage.errors import InvalidTransition, NotFound
from storage.events import add_event
from storage.models import Delivery, DeliveryState, Job, JobState
from storage.retry import Backoff, exhausted

Row = TypeVar("Row", Job, Delivery)
State = TypeVar("State", JobState, DeliveryState)
T = TypeVar("T")


def worker_name(role: str) -> str:
    """A readable, unique-enough name for this process: ``<role>@<host>:<pid>``."""
    return f"{role}@{socket.gethostname()[:64]}:{os.getpid()}"


def new_owner(worker: str) -> str:
    """A lease token for one claim by ``worker``."""
    return f"{worker[:110]}/{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True, kw_only=True)
class LeasedTable(Generic[Row, State]):
    """One leased table: its model, its states and the moves between them, its audit name."""

    model: type[Row]
    entity: str  # its name in the audit log and in messages: "job", "delivery"
    plural: str  # for messages: "jobs", "deliveries"
    states: type[State]
    moves: Mapping[State, frozenset[State]]
    ready: State  # waiting to be claimed (or for its retry time)
    running: State  # held under a lease
    failed: State  # a permanent error: trying again would fail the same way
    dead: State  # attempts used up; an operator may retry it
    retryable: tuple[State, ...]  # the states an operator may queue again, in the order messages name them
    holder: str  # who holds a lease, for the audit: "worker", "dispatcher"
    list_command: str  # where an operator finds the ids: "pacs-triage jobs list"
    max_error_chars: int  # how much of an error message ``last_error`` keeps
    on_move: Callable[[Row, State, dt.datetime], None] | None = None  # extra columns a move sets

    def move(self, session: Session, row: Row, to: State, now: dt.datetime, **detail: object) -> None:
        """Change a row's state, refusing moves :attr:`moves` does not allow; audit it."""
        current = self.states(row.state)
        if to not in self.moves[current]:
            allowed = ", ".join(sorted(self.moves[current])) or "none (final state)"
            raise InvalidTransition(
                f"{self.entity} {row.id} is {current.value}; it cannot become {to.value} (allowed: {allowed})"
            )
        # Both tables keep their state as String(16); ``to`` was checked against this table's moves.
        setattr(row, "state", to)  # noqa: B010 (mypy cannot tie Row to its own State enum)
        row.updated_at = now
        if self.on_move is not None:
            self.on_move(row, to, now)
        add_event(session, self.entity, row.id, to.value, previous=current.value, **detail)

    def revoke(self, session: Session, row: Row, to: State, now: dt.datetime, **detail: object) -> None:
        """Take the lease away and move the row (cancelled, superseded): its holder drops its work."""
        clear_lease(row)
        self.move(session, row, to, now, **detail)

    def get(self, session: Session, row_id: int, *, lock: bool = False) -> Row:
        """The row (locked for update with ``lock``), or :class:`NotFound` naming where to find ids."""
        row = session.get(self.model, row_id, with_for_update=lock)
        if row is None:
            raise NotFound(f"no {self.entity} {row_id}; see `{self.list_command}`")
        return row


class Leases(Generic[Row, State]):
    """Claims, extends and settles the rows of one :class:`LeasedTable`. Times come from ``clock``."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        table: LeasedTable[Row, State],
        *,
        lease_seconds: float,
        backoff: Backoff,
        clock: Callable[[], dt.datetime],
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.sessions = sessions
        self.table: LeasedTable[Row, State] = table
        self.lease_seconds = lease_seconds
        self.backoff = backoff
        self.clock = clock

    def claim(self, worker: str, view: Callable[[Session, Row], T]) -> tuple[T, str] | None:
        """The next due row (highest priority, then oldest) leased to ``worker``, as ``view`` sees it,
        with its lease owner; None when no row is due.
        """
        table, model = self.table, self.table.model
        owner = new_owner(worker)
        now = self.clock()
        with transaction(self.sessions, f"claiming a {table.entity}") as session:
            row_id = session.scalar(
                select(model.id)
                .where(model.state == table.ready, model.run_after <= now)
                .order_by(model.priority.desc(), model.created_at, model.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if row_id is None:
                return None
            # The move to running is this compare-and-set (not LeasedTable.move): on SQLite it is what
            # refuses a row another claimer took first. It is audited below like any move.
            claimed = session.scalar(
                update(model)
                .where(model.id == row_id, model.state == table.ready)
                .values(
                    state=table.running,
                    lease_owner=owner,
                    lease_expires_at=self._expiry(now),
                    attempts=model.attempts + 1,
                    updated_at=now,
                )
                .returning(model.id)
                .execution_options(synchronize_session=False)
            )
            if claimed is None:
                return None
            row = session.get_one(model, claimed)
            add_event(
                session,
                table.entity,
                row.id,
                table.running.value,
                previous=table.ready.value,
                attempt=row.attempts,
                owner=owner,
            )
            return view(session, row), owner

    def heartbeat(self, row_id: int, owner: str) -> bool:
        """Push the lease's expiry forward; False when it is no longer ours (reaped, cancelled, moved)."""
        model = self.table.model
        with transaction(self.sessions, f"extending a {self.table.entity} lease") as session:
            extended = session.scalar(
                update(model)
                .where(model.id == row_id, model.lease_owner == owner, model.state == self.table.running)
                .values(lease_expires_at=self._expiry(self.clock()))
                .returning(model.id)
                .execution_options(synchronize_session=False)
            )
            return extended is not None

    def settle(
        self, row_id: int, owner: str, doing: str, apply: Callable[[Session, Row, dt.datetime], T]
    ) -> T | None:
        """Run ``apply`` on the row, lease cleared, in one transaction, if ``owner`` still holds the
        lease; None (and nothing written) when it was lost meanwhile.
        """
        model, now = self.table.model, self.clock()
        with transaction(self.sessions, doing) as session:
            row = session.scalars(
                select(model)
                .where(model.id == row_id, model.lease_owner == owner, model.state == self.table.running)
                .with_for_update()
            ).one_or_none()
            if row is None:
                return None
            clear_lease(row)
            return apply(session, row, now)

    def after_failure(
        self, session: Session, row: Row, now: dt.datetime, error: str, *, permanent: bool, **detail: object
    ) -> State:
        """Record a failed attempt (inside :meth:`settle`): failed when ``permanent``, else ready
        again after a backoff, or dead when the attempts are used up. Returns the new state.
        """
        table = self.table
        row.last_error = error[: table.max_error_chars]
        detail = {"attempt": row.attempts, "error": error[:300], **detail}
        if permanent:
            table.move(session, row, table.failed, now, **detail)
            return table.failed
        if exhausted(row.attempts, row.max_attempts):
            table.move(session, row, table.dead, now, **detail)
            return table.dead
        delay = self.backoff.delay(row.attempts)
        row.run_after = now + dt.timedelta(seconds=delay)
        table.move(session, row, table.ready, now, retry_in_seconds=round(delay, 3), **detail)
        return table.ready

    def fail(self, row_id: int, owner: str, error: str, *, permanent: bool) -> State | None:
        """Record a failed attempt (see :meth:`after_failure`); None when the lease was lost."""
        return self.settle(
            row_id,
            owner,
            f"recording a failed {self.table.entity}",
            lambda session, row, now: self.after_failure(session, row, now, error, permanent=permanent),
        )

    def release(self, row_id: int, owner: str, *, reason: str, delay_seconds: float = 0.0) -> bool:
        """Give the lease back without counting the attempt (shutdown, input changed)."""

        def give_back(session: Session, row: Row, now: dt.datetime) -> bool:
            row.attempts = max(0, row.attempts - 1)
            row.run_after = now + dt.timedelta(seconds=delay_seconds)
            self.table.move(session, row, self.table.ready, now, reason=reason)
            return True

        return self.settle(row_id, owner, f"giving a {self.table.entity} lease back", give_back) or False

    def reap(self) -> int:
        """Make rows whose lease expired ready again, or dead on their last attempt; returns how many."""
        table, model, now = self.table, self.table.model, self.clock()
        with transaction(self.sessions, f"reaping {table.entity} leases") as session:
            ids = list(
                session.scalars(
                    select(model.id)
                    .where(model.state == table.running, model.lease_expires_at < now)
                    .order_by(model.id)
                    .with_for_update(skip_locked=True)
                )
            )
            for row_id in ids:
                row = session.get_one(model, row_id)
                detail = {
                    "reason": f"lease expired: the {table.holder} died, hung or lost the database",
                    "attempt": row.attempts,
                    "owner": row.lease_owner,
                }
                clear_lease(row)
                if exhausted(row.attempts, row.max_attempts):
                    row.last_error = f"lease expired on the last attempt ({row.attempts}/{row.max_attempts})"
                    table.move(session, row, table.dead, now, **detail)
                else:
                    row.run_after = now
                    table.move(session, row, table.ready, now, **detail)
            return len(ids)

    def retry(self, row_id: int, view: Callable[[Session, Row], T]) -> T:
        """Operator: queue a row in a retryable state again, with a fresh set of attempts."""
        table, now = self.table, self.clock()
        with transaction(self.sessions, f"retrying a {table.entity}") as session:
            row = table.get(session, row_id, lock=True)
            if table.states(row.state) not in table.retryable:
                *first, last = (state.value for state in table.retryable)
                allowed = f"{', '.join(first)} or {last}" if first else last
                raise InvalidTransition(
                    f"{table.entity} {row_id} is {row.state}; only {allowed} {table.plural} can be retried"
                )
            row.attempts = 0
            row.run_after = now
            table.move(session, row, table.ready, now, reason="retried by operator")
            return view(session, row)

    def _expiry(self, now: dt.datetime) -> dt.datetime:
        return now + dt.timedelta(seconds=self.lease_seconds)


def clear_lease(row: Job | Delivery) -> None:
    row.lease_owner = None
    row.lease_expires_at = None
