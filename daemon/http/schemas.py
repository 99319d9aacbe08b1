"""The public shapes of the API: what OpenAPI documents, built from storage's views (never table rows)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from daemon.service.health import Readiness
from storage.activity import AuditEvent, Throughput
from storage.operations import BulkOutcome, DeliveryOutcome, JobOutcome
from storage.outbox import DeliveryView
from storage.queue import JobView
from storage.studies import StudyDetail, StudySummary, TimelineEntry
from vocabulary import PriorityName


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


def _detail(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


class Job(_Out):
    id: int
    study_id: int
    study_instance_uid: str
    pipeline: str
    rule: str | None
    priority: PriorityName
    state: str
    attempts: int
    max_attempts: int
    run_after: dt.datetime
    last_error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, j: JobView) -> Job:
        return cls(
            id=j.id,
            study_id=j.study_id,
            study_instance_uid=j.study_instance_uid,
            pipeline=j.pipeline,
            rule=j.rule,
            priority=j.priority.name.lower(),
            state=j.state.value,
            attempts=j.attempts,
            max_attempts=j.max_attempts,
            run_after=j.run_after,
            last_error=j.last_error,
            created_at=j.created_at,
            updated_at=j.updated_at,
            finished_at=j.finished_at,
        )


class Delivery(_Out):
    id: int
    job_id: int
    result_id: int
    sop_instance_uid: str
    destination: str
    peer: str
    content: str  # what is sent of the result: "" the object itself; "hl7_oru", "hl7_priority", "fhir"...
    state: str
    attempts: int
    max_attempts: int
    run_after: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None

    @classmethod
    def of(cls, d: DeliveryView) -> Delivery:
        return cls(
            id=d.id,
            job_id=d.job_id,
            result_id=d.result_id,
            sop_instance_uid=d.sop_instance_uid,
            destination=d.destination,
            peer=d.peer,
            content=d.content,
            state=d.state.value,
            attempts=d.attempts,
            max_attempts=d.max_attempts,
            run_after=d.run_after,
            last_status=d.last_status,
            last_error=d.last_error,
            created_at=d.created_at,
            delivered_at=d.delivered_at,
        )


class Study(_Out):
    id: int
    study_instance_uid: str
    accession_number: str | None
    state: str
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    completed_at: dt.datetime | None
    route_rule: str | None
    series_count: int
    instance_count: int
    job_id: int | None
    job_state: str | None
    pipeline: str | None
    priority: PriorityName | None  # triage priority of the result; null until there is one
    main_finding: str | None
    time_to_result_seconds: float | None

    @classmethod
    def of(cls, s: StudySummary) -> Study:
        return cls(
            id=s.id,
            study_instance_uid=s.study_instance_uid,
            accession_number=s.accession_number,
            state=s.state.value,
            first_received_at=s.first_received_at,
            last_received_at=s.last_received_at,
            completed_at=s.completed_at,
            route_rule=s.route_rule,
            series_count=s.series_count,
            instance_count=s.instance_count,
            job_id=s.job_id,
            job_state=None if s.job_state is None else s.job_state.value,
            pipeline=s.pipeline,
            priority=None if s.priority is None else s.priority.name.lower(),
            main_finding=s.main_finding,
            time_to_result_seconds=s.time_to_result_seconds,
        )


class Series(_Out):
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    instance_count: int
    bytes_stored: int
    last_received_at: dt.datetime


class Result(_Out):
    id: int
    job_id: int
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    priority: PriorityName
    summary: str
    created_at: dt.datetime


class TimelineEvent(_Out):
    at: dt.datetime
    entity: str
    entity_id: str
    kind: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, e: TimelineEntry) -> TimelineEvent:
        return cls(at=e.at, entity=e.entity, entity_id=e.entity_id, kind=e.kind, detail=_detail(e.detail))


class Stage(_Out):
    """Seconds spent in one stage, from the last instance received to the result delivered."""

    stage: str
    seconds: float


class StudyDetailOut(_Out):
    study: Study
    route_detail: str | None
    series: list[Series]
    jobs: list[Job]
    results: list[Result]
    findings: list[str]
    deliveries: list[Delivery]
    stages: list[Stage]  # of the current job, once it succeeded
    timeline: list[TimelineEvent]

    @classmethod
    def of(cls, d: StudyDetail, stages: list[tuple[str, float]]) -> StudyDetailOut:
        return cls(
            stages=[Stage(stage=name, seconds=round(seconds, 3)) for name, seconds in stages],
            study=Study.of(d.study),
            route_detail=d.route_detail,
            series=[Series(**{k: getattr(s, k) for k in Series.model_fields}) for s in d.series],
            jobs=[Job.of(j) for j in d.jobs],
            results=[
                Result(
                    id=r.id,
                    job_id=r.job_id,
                    sop_class_uid=r.sop_class_uid,
                    sop_instance_uid=r.sop_instance_uid,
                    series_instance_uid=r.series_instance_uid,
                    priority=r.priority.name.lower(),
                    summary=r.summary,
                    created_at=r.created_at,
                )
                for r in d.results
            ],
            findings=d.findings,
            deliveries=[Delivery.of(x) for x in d.deliveries],
            timeline=[TimelineEvent.of(e) for e in d.timeline],
        )


class JobDetail(_Out):
    job: Job
    deliveries: list[Delivery]
    history: list[TimelineEvent]


class JobAction(_Out):
    job: Job
    changed: bool  # false: the job already was in the state asked for (the call is idempotent)

    @classmethod
    def of(cls, o: JobOutcome) -> JobAction:
        return cls(job=Job.of(o.job), changed=o.changed)


class DeliveryAction(_Out):
    delivery: Delivery
    changed: bool

    @classmethod
    def of(cls, o: DeliveryOutcome) -> DeliveryAction:
        return cls(delivery=Delivery.of(o.delivery), changed=o.changed)


class BulkRetry(_Out):
    jobs: list[int]
    deliveries: list[int]

    @classmethod
    def of(cls, o: BulkOutcome) -> BulkRetry:
        return cls(jobs=o.jobs, deliveries=o.deliveries)


class Event(_Out):
    id: int
    at: dt.datetime
    entity: str
    entity_id: str
    kind: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, e: AuditEvent) -> Event:
        return cls(
            id=e.id, at=e.at, entity=e.entity, entity_id=e.entity_id, kind=e.kind, detail=_detail(e.detail)
        )


class Component(_Out):
    ok: bool
    detail: str
    data: dict[str, Any]


class ReadinessOut(_Out):
    ready: bool
    components: dict[str, Component]

    @classmethod
    def of(cls, r: Readiness) -> ReadinessOut:
        return cls(
            ready=r.ready,
            components={k: Component(ok=c.ok, detail=c.detail, data=c.data) for k, c in r.components.items()},
        )


class ThroughputOut(_Out):
    window_seconds: float
    instances_received: int
    bytes_received: int
    studies_completed: int
    jobs_succeeded: int
    jobs_failed: int
    deliveries_delivered: int

    @classmethod
    def of(cls, t: Throughput) -> ThroughputOut:
        return cls(**{k: getattr(t, k) for k in cls.model_fields})


class Error(_Out):
    """Every error answer: a sentence that says what went wrong and what to do."""

    detail: str


READ_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "no token, or not one of this node's"},
    404: {"model": Error, "description": "no such row"},
    503: {"model": Error, "description": "the database is unavailable"},
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **READ_ERRORS,
    403: {"model": Error, "description": "a read token, or a cross-origin browser request"},
    409: {"model": Error, "description": "the state machine forbids this move; the detail says what to do"},
}


class Health(_Out):
    status: Literal["alive"]
