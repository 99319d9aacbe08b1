"""``/api/v1/studies``: the worklist (by triage priority, with filters) and one study in full."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query

from daemon.http.auth import require_role
from daemon.http.deps import NodeDep
from daemon.http.schemas import READ_ERRORS, PriorityName, Study, StudyDetailOut
from daemon.service.node import Node
from daemon.service.timeline import study_stages
from storage.models import JobState, StudyState
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.studies import StudyDetail, StudyFilter, study_detail, worklist
from vocabulary import Priority

router = APIRouter(
    prefix="/api/v1/studies",
    tags=["studies"],
    responses=READ_ERRORS,
    dependencies=[Depends(require_role("read"))],
)


def study_filter(
    state: Annotated[list[StudyState] | None, Query(description="study state (repeatable)")] = None,
    date: Annotated[dt.date | None, Query(description="first instance received on this UTC day")] = None,
    received_from: Annotated[dt.datetime | None, Query(description="received at or after (ISO 8601)")] = None,
    received_before: Annotated[dt.datetime | None, Query(description="received before (ISO 8601)")] = None,
    priority: Annotated[list[PriorityName] | None, Query(description="triage priority (repeatable)")] = None,
    pipeline: Annotated[str | None, Query(description="pipeline of the study's current job")] = None,
    study_instance_uid: Annotated[
        str | None, Query(description="one study by its Study Instance UID")
    ] = None,
    accession_number: Annotated[str | None, Query(description="studies with this Accession Number")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> StudyFilter:
    """Query parameters -> a storage filter (shared by the API and the worklist page)."""
    for value in (received_from, received_before):
        if value is not None and value.tzinfo is None:
            raise HTTPException(
                422, "received_from/received_before need a time zone, e.g. 2026-12-03T08:00:00Z"
            )
    if date is not None:
        start = dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC)
        received_from = max(received_from or start, start)
        end = start + dt.timedelta(days=1)
        received_before = min(received_before or end, end)
    return StudyFilter(
        states=tuple(state or ()),
        received_from=received_from,
        received_before=received_before,
        priorities=tuple(Priority.from_name(p) for p in priority or ()),
        pipeline=pipeline,
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
        limit=limit,
        offset=offset,
    )


@router.get("", response_model=list[Study], summary="Studies, highest triage priority first")
def list_studies(node: NodeDep, flt: Annotated[StudyFilter, Depends(study_filter)]) -> list[Study]:
    return [Study.of(s) for s in worklist(node.sessions, flt)]


@router.get(
    "/{study_id}",
    response_model=StudyDetailOut,
    summary="A study: series, jobs, results, deliveries, timeline",
)
def get_study(study_id: int, node: NodeDep) -> StudyDetailOut:
    detail = study_detail(node.sessions, study_id)
    return StudyDetailOut.of(detail, stages(node, detail))


def stages(node: Node, detail: StudyDetail) -> list[tuple[str, float]]:
    """The current job's time per stage (``daemon/service/timeline.py``), once it succeeded."""
    current = next((j for j in detail.jobs if j.id == detail.study.job_id), None)
    if current is None or current.state != JobState.SUCCEEDED:
        return []
    return study_stages(
        JobQueue(node.sessions), Outbox(node.sessions), current, last_received=detail.study.last_received_at
    )
