"""Read-only figures read at scrape time for ``/metrics`` (and any other reader that wants them).

Two kinds of reads, both cheap enough for every scrape (a handful of grouped COUNTs on indexed
columns, and range scans on primary keys):

* :func:`node_gauges`: the node's state now (studies, jobs, deliveries by state, the oldest
  queued job, components busy or idle from their heartbeats).
* :func:`activity_since`: what happened after a :class:`Cursor` (instances received, jobs that
  succeeded with their stage timings, deliveries made), so that the HTTP process can count events
  of every receiver and worker process, on any host, from the database alone.

A :class:`Cursor` is a pair of primary keys; :func:`cursor_at` finds the first one at or after a
time (once per process). On PostgreSQL a transaction that took an id earlier but committed after
a read is not seen by the next read (ids are handed out before commit): counts can miss such a
row, never count one twice.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, normalise_url, translate_errors
from storage.models import (
    Delivery,
    DeliveryState,
    Event,
    Heartbeat,
    Instance,
    Job,
    JobState,
    Result,
    Study,
    StudyState,
)
from storage.studies import ResultSummary
from vocabulary import Priority

_PRIORITY_NAMES = {int(p): p.name.lower() for p in Priority}
# Bounds the rows one read of events returns; the next read goes on from there.
EVENTS_PER_READ = 5000


def reader_engine(url: str) -> Engine:
    """A small engine for read-only scrapes: one connection, never creates the database.

    SQLite is opened read-only (``mode=ro``) and without the ``BEGIN IMMEDIATE`` of the writers,
    so a scrape never takes the write lock; in WAL mode it never blocks a writer either.
    """
    parsed = normalise_url(url)
    if parsed.get_backend_name() != "sqlite":
        return make_engine(url, pool_size=1)
    database = parsed.database or ":memory:"
    return create_engine(
        f"sqlite:///file:{database}?mode=ro&uri=true",
        connect_args={"timeout": 5, "check_same_thread": False},
        pool_size=1,
        max_overflow=1,
    )


def priority_name(value: int) -> str:
    return _PRIORITY_NAMES.get(value, str(value))


@dataclass(frozen=True, kw_only=True)
class NodeGauges:
    """The node's state at one moment."""

    studies: dict[str, int]  # state -> count (every state present)
    jobs: dict[tuple[str, str], int]  # (state, priority name) -> count (every pair)
    oldest_queued_seconds: float  # 0 when nothing is queued
    deliveries: dict[tuple[str, str], int]  # (state, destination) -> count (non-zero only)
    components: dict[tuple[str, str], int]  # (component, "busy" | "idle") -> fresh heartbeats

    @property
    def dead_jobs(self) -> int:
        return sum(n for (state, _p), n in self.jobs.items() if state == JobState.DEAD.value)

    @property
    def dead_deliveries(self) -> int:
        return sum(n for (state, _d), n in self.deliveries.items() if state == DeliveryState.DEAD.value)


def node_gauges(session: Session, *, now: dt.datetime, fresh_after: dt.datetime) -> NodeGauges:
    """Five grouped reads; components whose last heartbeat is older than ``fresh_after`` are left out."""
    with translate_errors("reading the node's state"):
        studies = {s.value: 0 for s in StudyState}
        for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
            studies[str(state)] = n
        # Every state x priority, zeros included: a dashboard line drops to 0 instead of vanishing.
        jobs = {(state.value, name): 0 for state in JobState for name in _PRIORITY_NAMES.values()}
        jobs |= {
            (str(state), priority_name(priority)): n
            for state, priority, n in session.execute(
                select(Job.state, Job.priority, func.count()).group_by(Job.state, Job.priority)
            )
        }
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
        deliveries = {
            (str(state), destination): n
            for state, destination, n in session.execute(
                select(Delivery.state, Delivery.destination, func.count()).group_by(
                    Delivery.state, Delivery.destination
                )
            )
        }
        components: dict[tuple[str, str], int] = {}
        for component, busy, n in session.execute(
            select(Heartbeat.component, Heartbeat.busy, func.count())
            .where(Heartbeat.beat_at >= fresh_after)
            .group_by(Heartbeat.component, Heartbeat.busy)
        ):
            key = (str(component), "busy" if busy else "idle")
            components[key] = components.get(key, 0) + n
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return NodeGauges(
        studies=studies,
        jobs=jobs,
        oldest_queued_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        deliveries=deliveries,
        components=components,
    )


@dataclass(frozen=True)
class Cursor:
    """Where the last read of activity stopped: the highest instance and event ids seen."""

    instance_id: int
    event_id: int


def cursor_at(session: Session, since: dt.datetime) -> Cursor:
    """The cursor just before the first instance and event at or after ``since`` (one scan, at start)."""
    with translate_errors("finding where to start counting"):
        first_instance = session.scalar(select(func.min(Instance.id)).where(Instance.received_at >= since))
        last_instance = session.scalar(select(func.max(Instance.id))) or 0
        first_event = session.scalar(select(func.min(Event.id)).where(Event.at >= since))
        last_event = session.scalar(select(func.max(Event.id))) or 0
    return Cursor(
        instance_id=last_instance if first_instance is None else first_instance - 1,
        event_id=last_event if first_event is None else first_event - 1,
    )


@dataclass(frozen=True, kw_only=True)
class Activity:
    """What happened between two cursors."""

    received: dict[str, tuple[int, int]] = field(default_factory=dict)  # calling AE -> (instances, bytes)
    stage_seconds: list[tuple[str, float]] = field(default_factory=list)  # (stage, seconds) per job
    delivery_seconds: list[float] = field(default_factory=list)  # outbox row created -> delivered
    time_to_result: list[float] = field(default_factory=list)  # last instance received -> first delivery


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def activity_since(session: Session, cursor: Cursor) -> tuple[Activity, Cursor]:
    """Instances, job successes and deliveries after ``cursor``; the new cursor."""
    with translate_errors("reading recent activity"):
        top_instance = session.scalar(select(func.max(Instance.id))) or cursor.instance_id
        received: dict[str, tuple[int, int]] = {}
        if top_instance > cursor.instance_id:
            for ae, n, size in session.execute(
                select(Instance.calling_ae, func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
                .where(Instance.id > cursor.instance_id, Instance.id <= top_instance)
                .group_by(Instance.calling_ae)
            ):
                received[str(ae)] = (int(n), int(size))
        # The top first: an event committed while this reads is left for the next read.
        top_event = session.scalar(select(func.max(Event.id))) or cursor.event_id
        rows = session.execute(
            select(Event.id, Event.entity, Event.entity_id, Event.detail)
            .where(
                Event.id > cursor.event_id,
                Event.id <= top_event,
                ((Event.entity == "job") & (Event.kind == JobState.SUCCEEDED.value))
                | ((Event.entity == "delivery") & (Event.kind == DeliveryState.DELIVERED.value)),
            )
            .order_by(Event.id)
            .limit(EVENTS_PER_READ)
        ).all()
        if len(rows) == EVENTS_PER_READ:
            top_event = rows[-1][0]
        stages: list[tuple[str, float]] = []
        delivered: list[int] = []
        for _id, entity, entity_id, detail in rows:
            if entity == "delivery":
                delivered.append(int(entity_id))
                continue
            for stage, seconds in _stages(detail):
                stages.append((stage, seconds))
        delivery_seconds, time_to_result = _deliveries(session, delivered)
    return (
        Activity(
            received=received,
            stage_seconds=stages,
            delivery_seconds=delivery_seconds,
            time_to_result=time_to_result,
        ),
        Cursor(instance_id=max(top_instance, cursor.instance_id), event_id=max(top_event, cursor.event_id)),
    )


def _stages(detail: str) -> list[tuple[str, float]]:
    try:
        stages = json.loads(detail).get("stages") if detail else None
    except (ValueError, AttributeError):
        return []
    if not isinstance(stages, dict):
        return []
    return [(str(k), float(v)) for k, v in stages.items() if isinstance(v, int | float)]


def _deliveries(session: Session, delivery_ids: list[int]) -> tuple[list[float], list[float]]:
    """Send latency of each delivery; time to result for those that were their job's first delivery."""
    if not delivery_ids:
        return [], []
    rows = session.execute(
        select(Delivery.id, Delivery.created_at, Delivery.delivered_at, Result.job_id, Study.last_received_at)
        .join(Result, Result.id == Delivery.result_id)
        .join(Study, Study.id == Result.study_id)
        .where(Delivery.id.in_(delivery_ids), Delivery.delivered_at.is_not(None))
    ).all()
    job_ids = {row.job_id for row in rows}
    first: dict[int, int] = {}  # job -> id of its first delivered row
    for job_id, d_id, _at in session.execute(
        select(Result.job_id, Delivery.id, Delivery.delivered_at)
        .join(Result, Result.id == Delivery.result_id)
        .where(Result.job_id.in_(job_ids), Delivery.delivered_at.is_not(None))
        .order_by(Delivery.delivered_at, Delivery.id)
    ):
        first.setdefault(job_id, d_id)
    latency = [max(0.0, (_as_utc(r.delivered_at) - _as_utc(r.created_at)).total_seconds()) for r in rows]
    to_result = [
        max(0.0, (_as_utc(r.delivered_at) - _as_utc(r.last_received_at)).total_seconds())
        for r in rows
        if first.get(r.job_id) == r.id
    ]
    return latency, to_result


def job_results(sessions: sessionmaker[Session], job_id: int) -> list[ResultSummary]:
    """The result objects a job produced, with their triage priority and findings (``jobs show``)."""
    with translate_errors("reading a job's results"), sessions() as session:
        return [
            ResultSummary(
                id=r.id,
                job_id=r.job_id,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_instance_uid,
                priority=Priority(r.priority),
                summary=r.summary,
                created_at=r.created_at,
            )
            for r in session.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.id))
        ]
