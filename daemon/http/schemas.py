"""The public shapes of the API: what OpenAPI documents, built from storage's views (never table rows)."""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from daemon.service.health import Readiness
from storage.activity import AuditEvent, Throughput
from storage.operations import BulkOutcome, DeliveryOutcome, JobOutcome
from storage.outbox import DeliveryView
from storage.queue import JobView
from storage.studies import StudyDetail, StudySummary, TimelineEntry
from vocabulary import Priority, PriorityName


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)

    @classmethod
    def _copied(cls, view: object) -> Self:
        """This model's fields, read by name from a storage view: a priority by its lower-case name
        (``PriorityName``), any other enum by its value."""
        return cls(**{name: _public(getattr(view, name)) for name in cls.model_fields})


def _public(value: object) -> object:
    if isinstance(value, Priority):
        return value.name.lower()
    return value.value if isinstance(value, enum.Enum) else value


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
        return cls._copied(j)


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
        return cls._copied(d)


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
        return cls._copied(s)


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
        return cls._copied(t)


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
