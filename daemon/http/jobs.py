"""``/api/v1/jobs``: list, show, retry, cancel, re-run; and the bulk retry of everything dead.

Changes go through ``storage/operations.py`` (as the command line's do): idempotent, audited with
the token's name.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from daemon.http.auth import Principal, require_role
from daemon.http.deps import NodeDep, Now
from daemon.http.schemas import ADMIN_ERRORS, BulkRetry, Delivery, Job, JobAction, JobDetail, TimelineEvent
from storage import operations
from storage.activity import recent_events
from storage.models import JobState
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.studies import TimelineEntry

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=ADMIN_ERRORS)
dead_router = APIRouter(prefix="/api/v1/dead", tags=["jobs", "deliveries"], responses=ADMIN_ERRORS)
Admin = Annotated[Principal, Depends(require_role("admin"))]


@router.get("", response_model=list[Job], dependencies=[Depends(require_role("read"))])
def list_jobs(
    node: NodeDep,
    state: Annotated[list[JobState] | None, Query(description="job state (repeatable)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Job]:
    return [Job.of(j) for j in JobQueue(node.sessions).recent(list(state or ()), limit)]


@router.get("/{job_id}", response_model=JobDetail, dependencies=[Depends(require_role("read"))])
def get_job(job_id: int, node: NodeDep) -> JobDetail:
    job = JobQueue(node.sessions).get(job_id)
    history = recent_events(node.sessions, entity="job", entity_id=str(job_id), limit=1000)
    return JobDetail(
        job=Job.of(job),
        deliveries=[Delivery.of(d) for d in Outbox(node.sessions).for_job(job_id)],
        history=[
            TimelineEvent.of(
                TimelineEntry(at=e.at, entity=e.entity, entity_id=e.entity_id, kind=e.kind, detail=e.detail)
            )
            for e in reversed(history)
        ],
    )


@router.post(
    "/{job_id}/retry", response_model=JobAction, summary="Queue a failed, dead or cancelled job again"
)
def retry_job(job_id: int, node: NodeDep, now: Now, caller: Admin) -> JobAction:
    return JobAction.of(operations.retry_job(node.sessions, job_id, by=caller.name, now=now))


@router.post("/{job_id}/cancel", response_model=JobAction, summary="Cancel a job that has not succeeded")
def cancel_job(job_id: int, node: NodeDep, now: Now, caller: Admin) -> JobAction:
    return JobAction.of(operations.cancel_job(node.sessions, job_id, by=caller.name, now=now))


@router.post(
    "/{job_id}/rerun", response_model=JobAction, summary="Run a succeeded job again on the same input"
)
def rerun_job(job_id: int, node: NodeDep, now: Now, caller: Admin) -> JobAction:
    return JobAction.of(operations.rerun_job(node.sessions, job_id, by=caller.name, now=now))


@dead_router.post("/retry", response_model=BulkRetry, summary="Queue every dead job and dead delivery again")
def retry_all_dead(node: NodeDep, now: Now, caller: Admin) -> BulkRetry:
    return BulkRetry.of(operations.retry_all_dead(node.sessions, by=caller.name, now=now))
