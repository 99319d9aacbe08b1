"""What happened recently: the audit log filtered for operators, and throughput over a window."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import translate_errors
from storage.models import Delivery, DeliveryState, Event, Instance, Job, JobState, Study


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    id: int
    at: dt.datetime
    entity: str
    entity_id: str
    kind: str
    detail: str


def recent_events(
    sessions: sessionmaker[Session],
    *,
    entity: str | None = None,
    entity_id: str | None = None,
    kind: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Audit rows, newest first; ``before_id`` pages back from an earlier answer."""
    query = select(Event).order_by(Event.id.desc()).limit(limit)
    if entity is not None:
        query = query.where(Event.entity == entity)
    if entity_id is not None:
        query = query.where(Event.entity_id == entity_id)
    if kind is not None:
        query = query.where(Event.kind == kind)
    if before_id is not None:
        query = query.where(Event.id < before_id)
    with translate_errors("reading audit events"), sessions() as session:
        return [
            AuditEvent(id=e.id, at=e.at, entity=e.entity, entity_id=e.entity_id, kind=e.kind, detail=e.detail)
            for e in session.scalars(query)
        ]


@dataclass(frozen=True, kw_only=True)
class Throughput:
    """Counts over the last ``window_seconds``."""

    window_seconds: float
    instances_received: int
    bytes_received: int
    studies_completed: int
    jobs_succeeded: int
    jobs_failed: int  # failed or dead
    deliveries_delivered: int


def throughput(sessions: sessionmaker[Session], *, now: dt.datetime, window: dt.timedelta) -> Throughput:
    """How much the node received, analysed and delivered since ``now - window``."""
    since = now - window
    with translate_errors("reading throughput"), sessions() as session:
        instances, size = session.execute(
            select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0)).where(
                Instance.received_at >= since
            )
        ).one()
        studies = session.scalar(select(func.count()).select_from(Study).where(Study.completed_at >= since))
        succeeded = session.scalar(
            select(func.count()).where(Job.state == JobState.SUCCEEDED, Job.finished_at >= since)
        )
        failed = session.scalar(
            select(func.count()).where(
                Job.state.in_([JobState.FAILED, JobState.DEAD]), Job.finished_at >= since
            )
        )
        delivered = session.scalar(
            select(func.count()).where(
                Delivery.state == DeliveryState.DELIVERED, Delivery.delivered_at >= since
            )
        )
    return Throughput(
        window_seconds=window.total_seconds(),
        instances_received=int(instances),
        bytes_received=int(size),
        studies_completed=int(studies or 0),
        jobs_succeeded=int(succeeded or 0),
        jobs_failed=int(failed or 0),
        deliveries_delivered=int(delivered or 0),
    )
