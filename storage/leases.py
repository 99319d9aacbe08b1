"""Leases on queue rows (jobs and outbox deliveries): claim the next one, extend, take back, reap.

A lease owner is a token unique to one claim (``<worker>/<random>``), so a worker whose lease
expired and was handed to another can never finish, extend or release the new holder's claim:
every write after the claim is a compare-and-set on ``(id, lease_owner, state)``.

Claiming, one API on both backends:

* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` picks a row no other transaction holds, so
  many workers claim in parallel without waiting on each other.
* SQLite: every transaction starts with ``BEGIN IMMEDIATE`` (``storage/db.py``), so a claim holds
  the single write lock from its first read; the ``UPDATE ... WHERE state = <ready>`` that follows
  is a compare-and-set that would refuse a row someone else moved. (SQLAlchemy renders no
  ``FOR UPDATE`` on SQLite.)
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import Delivery, Job
from storage.retry import Backoff, exhausted

LeasedRow = Job | Delivery
LeasedModel = type[Job] | type[Delivery]
Row = TypeVar("Row", Job, Delivery)


def worker_name(role: str) -> str:
    """A readable, unique-enough name for this process: ``<role>@<host>:<pid>``."""
    return f"{role}@{socket.gethostname()[:64]}:{os.getpid()}"


def new_owner(worker: str) -> str:
    """A lease token for one claim by ``worker``."""
    return f"{worker[:110]}/{uuid.uuid4().hex[:16]}"


def claim_next(
    session: Session,
    model: LeasedModel,
    *,
    ready: str,
    running: str,
    owner: str,
    now: dt.datetime,
    lease_seconds: float,
) -> int | None:
    """Move the first ready row (highest priority, then oldest) to ``running`` under ``owner``."""
    candidate = (
        select(model.id)
        .where(model.state == ready, model.run_after <= now)
        .order_by(model.priority.desc(), model.created_at, model.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    row_id = session.scalar(candidate)
    if row_id is None:
        return None
    claimed = session.scalar(
        update(model)
        .where(model.id == row_id, model.state == ready)
        .values(
            state=running,
            lease_owner=owner,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
            attempts=model.attempts + 1,
            updated_at=now,
        )
        .returning(model.id)
        .execution_options(synchronize_session=False)
    )
    return claimed


def extend(
    session: Session,
    model: LeasedModel,
    row_id: int,
    *,
    owner: str,
    running: str,
    now: dt.datetime,
    lease_seconds: float,
) -> bool:
    """Heartbeat: push the lease's expiry forward; False when the lease is no longer ours."""
    extended = session.scalar(
        update(model)
        .where(model.id == row_id, model.lease_owner == owner, model.state == running)
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .returning(model.id)
        .execution_options(synchronize_session=False)
    )
    return extended is not None


def take(session: Session, model: type[Row], row_id: int, *, owner: str, running: str) -> Row | None:
    """The row, locked, if ``owner`` still holds its lease; None when it was reaped or moved."""
    return session.scalars(
        select(model)
        .where(model.id == row_id, model.lease_owner == owner, model.state == running)
        .with_for_update()
    ).one_or_none()


def expired(session: Session, model: LeasedModel, *, running: str, now: dt.datetime) -> list[int]:
    """Ids of running rows whose lease ran out (their holder died, hung or lost the database)."""
    return list(
        session.scalars(
            select(model.id)
            .where(model.state == running, model.lease_expires_at < now)
            .order_by(model.id)
            .with_for_update(skip_locked=True)
        )
    )


def clear_lease(row: LeasedRow) -> None:
    row.lease_owner = None
    row.lease_expires_at = None


def schedule_retry(row: LeasedRow, backoff: Backoff, now: dt.datetime) -> float | None:
    """After a failed attempt: the delay before the next one (``run_after`` set), or None when the
    attempts are used up and the row must die.
    """
    if exhausted(row.attempts, row.max_attempts):
        return None
    delay = backoff.delay(row.attempts)
    row.run_after = now + dt.timedelta(seconds=delay)
    return delay
