"""Read-only views of received studies: the worklist (by triage priority) and one study in full.

A study's *current* job is its newest job that was not superseded; its triage result is the
highest priority among that job's results, and its main finding the first line of their summary.
Time to result runs from the last instance received to the arrival of the result's last delivery
(or to the job's success when nothing is to be delivered); it is unknown while a delivery is due.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import translate_errors
from storage.errors import NotFound
from storage.models import Delivery, Event, Instance, Job, JobState, Result, Series, Study, StudyState
from storage.outbox import DeliveryView, Outbox
from storage.queue import JobView
from vocabulary import Priority


@dataclass(frozen=True, kw_only=True)
class StudyFilter:
    """Which studies to list; every field left as None matches all."""

    states: tuple[StudyState, ...] = ()
    received_from: dt.datetime | None = None  # first instance received at or after
    received_before: dt.datetime | None = None  # ... and before
    priorities: tuple[Priority, ...] = ()  # triage priority of the current result
    pipeline: str | None = None  # the current job's pipeline
    study_instance_uid: str | None = None
    accession_number: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True, kw_only=True)
class StudySummary:
    """One line of the worklist."""

    id: int
    study_instance_uid: str
    accession_number: str | None
    state: StudyState
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    completed_at: dt.datetime | None
    route_rule: str | None
    series_count: int
    instance_count: int
    job_id: int | None
    job_state: JobState | None
    pipeline: str | None
    priority: Priority | None  # triage priority of the result; None until there is one
    main_finding: str | None
    result_at: dt.datetime | None

    @property
    def time_to_result_seconds(self) -> float | None:
        if self.result_at is None:
            return None
        return max(0.0, (self.result_at - self.last_received_at).total_seconds())


@dataclass(frozen=True, kw_only=True)
class SeriesSummary:
    id: int
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    instance_count: int
    bytes_stored: int
    last_received_at: dt.datetime


@dataclass(frozen=True, kw_only=True)
class ResultSummary:
    id: int
    job_id: int
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    priority: Priority
    summary: str
    created_at: dt.datetime


@dataclass(frozen=True, kw_only=True)
class TimelineEntry:
    """One audit row of the study or of its series, jobs, results and deliveries."""

    at: dt.datetime
    entity: str
    entity_id: str
    kind: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class StudyDetail:
    study: StudySummary
    route_detail: str | None
    series: list[SeriesSummary]
    jobs: list[JobView]
    results: list[ResultSummary]  # of the current job
    deliveries: list[DeliveryView]  # of the current job
    timeline: list[TimelineEntry]

    @property
    def findings(self) -> list[str]:
        """The current result's summary, one finding per line."""
        if not self.results:
            return []
        return [line for line in self.results[0].summary.splitlines() if line.strip()]


def _current_jobs() -> ColumnElement[int]:
    return (
        select(func.max(Job.id))
        .where(Job.study_id == Study.id, Job.state != JobState.SUPERSEDED)
        .correlate(Study)
        .scalar_subquery()
    )


def _listing(flt: StudyFilter) -> tuple[Select[Any], ColumnElement[Any]]:
    series_n = select(Series.study_id, func.count().label("n")).group_by(Series.study_id).subquery("series_n")
    instance_n = (
        select(Series.study_id, func.count(Instance.id).label("n"))
        .join(Instance, Instance.series_id == Series.id)
        .group_by(Series.study_id)
        .subquery("instance_n")
    )
    result_of = (
        select(
            Result.job_id,
            func.max(Result.priority).label("priority"),
            func.min(Result.summary).label("summary"),
            func.max(Result.created_at).label("created_at"),
        )
        .group_by(Result.job_id)
        .subquery("result_of")
    )
    delivered = (
        select(
            Result.job_id,
            func.max(Delivery.delivered_at).label("at"),
            func.count().label("n"),
            func.count(Delivery.delivered_at).label("done"),
        )
        .join(Delivery, Delivery.result_id == Result.id)
        .group_by(Result.job_id)
        .subquery("delivered")
    )
    query = (
        select(
            Study,
            func.coalesce(series_n.c.n, 0),
            func.coalesce(instance_n.c.n, 0),
            Job,
            result_of.c.priority,
            result_of.c.summary,
            # The result is there when its last delivery arrived; without deliveries, when the job ended.
            case(
                (delivered.c.n.is_(None), Job.finished_at),
                (delivered.c.n == delivered.c.done, delivered.c.at),
                else_=None,
            ),
        )
        .outerjoin(series_n, series_n.c.study_id == Study.id)
        .outerjoin(instance_n, instance_n.c.study_id == Study.id)
        .outerjoin(Job, Job.id == _current_jobs())
        .outerjoin(result_of, result_of.c.job_id == Job.id)
        .outerjoin(delivered, and_(delivered.c.job_id == Job.id, Job.state == JobState.SUCCEEDED))
    )
    if flt.states:
        query = query.where(Study.state.in_(list(flt.states)))
    if flt.received_from is not None:
        query = query.where(Study.first_received_at >= flt.received_from)
    if flt.received_before is not None:
        query = query.where(Study.first_received_at < flt.received_before)
    if flt.priorities:
        query = query.where(result_of.c.priority.in_([int(p) for p in flt.priorities]))
    if flt.pipeline is not None:
        query = query.where(Job.pipeline == flt.pipeline)
    if flt.study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == flt.study_instance_uid)
    if flt.accession_number is not None:
        query = query.where(Study.accession_number == flt.accession_number)
    return query, result_of.c.priority


def _summary(row: Sequence[Any]) -> StudySummary:
    study, n_series, n_instances, job, priority, summary, result_at = row
    succeeded = job is not None and JobState(job.state) == JobState.SUCCEEDED
    return StudySummary(
        id=study.id,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        state=StudyState(study.state),
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        completed_at=study.completed_at,
        route_rule=study.route_rule,
        series_count=int(n_series),
        instance_count=int(n_instances),
        job_id=None if job is None else job.id,
        job_state=None if job is None else JobState(job.state),
        pipeline=None if job is None else job.pipeline,
        priority=None if priority is None else Priority(priority),
        main_finding=(summary or "").strip().splitlines()[0] if summary and summary.strip() else None,
        result_at=result_at if succeeded else None,
    )


def worklist(sessions: sessionmaker[Session], flt: StudyFilter | None = None) -> list[StudySummary]:
    """Studies, highest triage priority first (studies without a result last), then newest first."""
    flt = flt or StudyFilter()
    query, priority_col = _listing(flt)
    query = (
        query.order_by(func.coalesce(priority_col, -1).desc(), Study.last_received_at.desc(), Study.id.desc())
        .limit(flt.limit)
        .offset(flt.offset)
    )
    with translate_errors("listing studies"), sessions() as session:
        return [_summary(tuple(row)) for row in session.execute(query)]


def study_detail(sessions: sessionmaker[Session], study_id: int) -> StudyDetail:
    """One study with its series, jobs, current results and deliveries, and its whole timeline."""
    with translate_errors("reading a study"), sessions() as session:
        row = session.execute(_listing(StudyFilter())[0].where(Study.id == study_id)).one_or_none()
        if row is None:
            raise NotFound(f"no study {study_id}; see GET /api/v1/studies or `pacs-triage status`")
        summary = _summary(tuple(row))
        study = row[0]
        series = [
            SeriesSummary(
                id=s.id,
                series_instance_uid=s.series_instance_uid,
                series_number=s.series_number,
                modality=s.modality,
                body_part_examined=s.body_part_examined,
                series_description=s.series_description,
                instance_count=int(n),
                bytes_stored=int(size),
                last_received_at=s.last_received_at,
            )
            for s, n, size in session.execute(
                select(Series, func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
                .outerjoin(Instance, Instance.series_id == Series.id)
                .where(Series.study_id == study_id)
                .group_by(Series.id)
                .order_by(Series.series_number, Series.id)
            )
        ]
        jobs = [
            JobView.from_row(job, study.study_instance_uid)
            for job in session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id.desc()))
        ]
        results = [
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
            for r in session.scalars(
                select(Result).where(Result.job_id == summary.job_id).order_by(Result.id)
            )
        ]
        timeline = _timeline(session, study_id, [j.id for j in jobs])
    deliveries = Outbox(sessions).for_job(summary.job_id) if summary.job_id is not None else []
    return StudyDetail(
        study=summary,
        route_detail=study.route_detail,
        series=series,
        jobs=jobs,
        results=results,
        deliveries=deliveries,
        timeline=timeline,
    )


def _timeline(session: Session, study_id: int, job_ids: Sequence[int]) -> list[TimelineEntry]:
    result_ids = [str(i) for i in session.scalars(select(Result.id).where(Result.study_id == study_id))]
    delivery_ids = [
        str(i)
        for i in session.scalars(
            select(Delivery.id)
            .join(Result, Result.id == Delivery.result_id)
            .where(Result.study_id == study_id)
        )
    ]
    series_ids = [str(i) for i in session.scalars(select(Series.id).where(Series.study_id == study_id))]
    clauses = [and_(Event.entity == "study", Event.entity_id == str(study_id))]
    for entity, ids in (
        ("series", series_ids),
        ("job", [str(i) for i in job_ids]),
        ("result", result_ids),
        ("delivery", delivery_ids),
    ):
        if ids:
            clauses.append(and_(Event.entity == entity, Event.entity_id.in_(ids)))
    return [
        TimelineEntry(at=e.at, entity=e.entity, entity_id=e.entity_id, kind=e.kind, detail=e.detail)
        for e in session.scalars(select(Event).where(or_(*clauses)).order_by(Event.at, Event.id))
    ]
