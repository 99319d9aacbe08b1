"""Read-only summaries for ``pacs-triage status``."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import translate_errors
from storage.identity import IDENTITY_CONFLICT_EVENT
from storage.models import (
    Delivery,
    DeliveryState,
    Event,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    StudyState,
)
from vocabulary import Priority

RESEND_MARK = "lease expired"  # the reason storage/leases.py's reaper records when it requeues a row


@dataclass(frozen=True)
class Counts:
    studies: int
    series: int
    instances: int
    bytes_stored: int
    studies_by_state: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)


def counts(sessions: sessionmaker[Session]) -> Counts:
    with translate_errors("reading status"), sessions() as session:
        studies = session.scalar(select(func.count()).select_from(Study)) or 0
        series = session.scalar(select(func.count()).select_from(Series)) or 0
        instances, size = session.execute(
            select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
        ).one()
        by_state = {s.value: 0 for s in StudyState}
        for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
            by_state[str(state)] = n
        jobs = {s.value: 0 for s in JobState}
        for job_state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs[str(job_state)] = n
    return Counts(
        studies=studies,
        series=series,
        instances=int(instances),
        bytes_stored=int(size),
        studies_by_state=by_state,
        jobs=jobs,
    )


_PRIORITIES = frozenset(int(p) for p in Priority)


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A dead job, dead delivery or unrouted study, for the operator's attention."""

    id: int
    study_instance_uid: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class QueueSummary:
    """The queue at a glance: depth by state and priority, how long the oldest job waits, what is stuck."""

    jobs_by_state: dict[str, dict[str, int]]  # state -> priority name -> count (only non-zero)
    oldest_queued_seconds: float | None  # age of the oldest job waiting to run
    deliveries_by_state: dict[str, int]
    dead_jobs: list[Problem]
    dead_deliveries: list[Problem]
    not_routed: list[Problem]
    dead_jobs_total: int
    dead_deliveries_total: int
    not_routed_total: int
    # Jobs that failed permanently (no usable series, bad geometry, bundle refused): the reason is
    # the job's last error, fixed only by other input or another pipeline.
    failed_jobs: list[Problem] = field(default_factory=list)
    failed_jobs_total: int = 0
    # Sends whose outcome was unknown (the dispatcher died or hung holding the lease), so the row
    # was sent again: the PACS saw a duplicate (deterministic UIDs make it the same object).
    resent_deliveries_total: int = 0
    # Instances refused because they contradict a stored study's identity (another patient, a
    # series or instance UID reused): never merged; the sender must correct and resend them.
    identity_conflicts: list[Problem] = field(default_factory=list)
    identity_conflicts_total: int = 0


def queue_summary(sessions: sessionmaker[Session], now: dt.datetime, *, limit: int = 10) -> QueueSummary:
    """Read the queue's state for ``pacs-triage status`` (``limit`` problems of each kind listed)."""
    with translate_errors("reading the queue status"), sessions() as session:
        by_state: dict[str, dict[str, int]] = {s.value: {} for s in JobState}
        for state, priority, n in session.execute(
            select(Job.state, Job.priority, func.count()).group_by(Job.state, Job.priority)
        ):
            name = Priority(priority).name.lower() if priority in _PRIORITIES else str(priority)
            by_state.setdefault(str(state), {})[name] = n
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
        deliveries = {s.value: 0 for s in DeliveryState}
        for d_state, n in session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
            deliveries[str(d_state)] = n
        dead_jobs, failed_jobs = (
            [
                Problem(id=job_id, study_instance_uid=uid, detail=error or "")
                for job_id, uid, error in session.execute(
                    select(Job.id, Study.study_instance_uid, Job.last_error)
                    .join(Study, Study.id == Job.study_id)
                    .where(Job.state == state)
                    .order_by(Job.id.desc())
                    .limit(limit)
                )
            ]
            for state in (JobState.DEAD, JobState.FAILED)
        )
        dead_deliveries = [
            Problem(
                id=d_id,
                study_instance_uid=uid,
                detail=f"{peer}{' ' + content if content else ''}: {error or ''}",
            )
            for d_id, uid, peer, content, error in session.execute(
                select(
                    Delivery.id,
                    Study.study_instance_uid,
                    Delivery.peer,
                    Delivery.content,
                    Delivery.last_error,
                )
                .join(Result, Result.id == Delivery.result_id)
                .join(Study, Study.id == Result.study_id)
                .where(Delivery.state == DeliveryState.DEAD)
                .order_by(Delivery.id.desc())
                .limit(limit)
            )
        ]
        not_routed = [
            Problem(id=s_id, study_instance_uid=uid, detail=detail or "")
            for s_id, uid, detail in session.execute(
                select(Study.id, Study.study_instance_uid, Study.route_detail)
                .where(Study.state == StudyState.NOT_ROUTED)
                .order_by(Study.id.desc())
                .limit(limit)
            )
        ]
        not_routed_total = (
            session.scalar(
                select(func.count()).select_from(Study).where(Study.state == StudyState.NOT_ROUTED)
            )
            or 0
        )
        resent = session.scalar(
            select(func.count())
            .select_from(Event)
            .where(
                Event.entity == "delivery",
                Event.kind == DeliveryState.PENDING.value,
                Event.detail.contains(RESEND_MARK),
            )
        )
        conflicts, conflicts_total = _identity_conflicts(session, limit)
    return QueueSummary(
        identity_conflicts=conflicts,
        identity_conflicts_total=conflicts_total,
        resent_deliveries_total=resent or 0,
        jobs_by_state=by_state,
        oldest_queued_seconds=(now - oldest).total_seconds() if oldest is not None else None,
        deliveries_by_state=deliveries,
        dead_jobs=dead_jobs,
        dead_deliveries=dead_deliveries,
        not_routed=not_routed,
        dead_jobs_total=sum(by_state.get(JobState.DEAD.value, {}).values()),
        dead_deliveries_total=deliveries[DeliveryState.DEAD.value],
        not_routed_total=not_routed_total,
        failed_jobs=failed_jobs,
        failed_jobs_total=sum(by_state.get(JobState.FAILED.value, {}).values()),
    )


def _identity_conflicts(session: Session, limit: int) -> tuple[list[Problem], int]:
    """The latest refusals for identity conflicts (storage/ingest.py), with the study they hit."""
    where = (Event.entity == "study", Event.kind == IDENTITY_CONFLICT_EVENT)
    total = session.scalar(select(func.count()).select_from(Event).where(*where)) or 0
    problems = []
    for event_id, study_id, detail in session.execute(
        select(Event.id, Event.entity_id, Event.detail).where(*where).order_by(Event.id.desc()).limit(limit)
    ):
        facts = json.loads(detail) if detail else {}
        uid = session.scalar(select(Study.study_instance_uid).where(Study.id == int(study_id))) or "?"
        problems.append(
            Problem(
                id=event_id,
                study_instance_uid=uid,
                detail=f"{facts.get('reason', '')}; from {facts.get('calling_ae', '?')}, "
                f"instance {facts.get('sop_instance_uid', '?')}",
            )
        )
    return problems, total
