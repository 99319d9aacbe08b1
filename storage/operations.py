"""Operator actions on jobs and deliveries, shared by the HTTP API, the pages and the command line.

Every action is idempotent: asking for a state the row is already in (retrying a job that is
queued again, cancelling a cancelled delivery) changes nothing and says so (``changed`` False).
Asking for a move the state machine forbids raises :class:`InvalidTransition` with what to do
instead. Each call appends an audit row naming who asked (``by``: the API token's name, or
``cli``), in the same transaction as the change.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from storage import leases
from storage import outbox as outbox_rows
from storage import queue as job_rows
from storage.db import transaction
from storage.errors import InvalidTransition, NotFound
from storage.events import add_event
from storage.models import Delivery, DeliveryState, Job, JobState, Result, Study
from storage.outbox import DeliveryView
from storage.queue import JobView

log = logging.getLogger(__name__)

J = JobState
D = DeliveryState


@dataclass(frozen=True, kw_only=True)
class JobOutcome:
    job: JobView
    changed: bool  # False: the job already was where the action puts it


@dataclass(frozen=True, kw_only=True)
class DeliveryOutcome:
    delivery: DeliveryView
    changed: bool


@dataclass(frozen=True, kw_only=True)
class BulkOutcome:
    jobs: list[int]  # ids queued again
    deliveries: list[int]


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"no job {job_id}; see GET /api/v1/jobs or `pacs-triage jobs list`")
    return job


def _job_view(session: Session, job: Job) -> JobView:
    uid = session.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id))
    return JobView.from_row(job, uid or "")


def _audit(session: Session, entity: str, entity_id: int, action: str, by: str, changed: bool) -> None:
    add_event(session, entity, entity_id, "operator", action=action, by=by, changed=changed)
    log.info("%s %d: %s by %s%s", entity, entity_id, action, by, "" if changed else " (nothing to change)")


def _requeue_job(session: Session, job: Job, now: dt.datetime, by: str, reason: str) -> None:
    job.attempts = 0
    job.run_after = now
    job_rows.move(session, job, J.QUEUED, now, reason=reason, by=by)


def retry_job(sessions: sessionmaker[Session], job_id: int, *, by: str, now: dt.datetime) -> JobOutcome:
    """Queue a failed, dead or cancelled job again with fresh attempts; a queued or running one stays."""
    with transaction(sessions, "retrying a job") as session:
        job = _job(session, job_id)
        state = J(job.state)
        changed = state in job_rows.RETRYABLE
        if changed:
            _requeue_job(session, job, now, by, "retried by operator")
        elif state not in (J.QUEUED, J.RUNNING):
            hint = "re-run it instead" if state == J.SUCCEEDED else "a newer job of its study replaced it"
            raise InvalidTransition(
                f"job {job_id} is {state.value}; only failed, dead or cancelled jobs can be retried ({hint})"
            )
        _audit(session, "job", job_id, "retry", by, changed)
        return JobOutcome(job=_job_view(session, job), changed=changed)


def cancel_job(sessions: sessionmaker[Session], job_id: int, *, by: str, now: dt.datetime) -> JobOutcome:
    """Cancel a job that has not succeeded (a running one's worker drops its result)."""
    with transaction(sessions, "cancelling a job") as session:
        job = _job(session, job_id)
        state = J(job.state)
        changed = state != J.CANCELLED
        if changed:
            if J.CANCELLED not in job_rows.JOB_MOVES[state]:
                raise InvalidTransition(
                    f"job {job_id} is {state.value}; only unfinished jobs can be cancelled"
                )
            leases.clear_lease(job)
            job_rows.move(session, job, J.CANCELLED, now, reason="cancelled by operator", by=by)
        _audit(session, "job", job_id, "cancel", by, changed)
        return JobOutcome(job=_job_view(session, job), changed=changed)


def rerun_job(sessions: sessionmaker[Session], job_id: int, *, by: str, now: dt.datetime) -> JobOutcome:
    """Run a succeeded job again on the same input; a queued or running one stays.

    Its results and their deliveries are replaced: the pipeline derives the result UIDs from the
    input, so the new objects carry the same UIDs and a PACS that kept the first copy ignores the
    second. The audit trail keeps the first run.
    """
    with transaction(sessions, "re-running a job") as session:
        job = _job(session, job_id)
        state = J(job.state)
        changed = state == J.SUCCEEDED
        if changed:
            result_ids = list(session.scalars(select(Result.id).where(Result.job_id == job_id)))
            if result_ids:
                session.execute(delete(Delivery).where(Delivery.result_id.in_(result_ids)))
                session.execute(delete(Result).where(Result.id.in_(result_ids)))
            job.attempts = 0
            job.run_after = now
            job.finished_at = None
            job.state = J.QUEUED
            job.updated_at = now
            add_event(
                session,
                "job",
                job_id,
                J.QUEUED.value,
                previous=state.value,
                reason="re-run by operator",
                by=by,
                replaced_results=len(result_ids),
            )
        elif state not in (J.QUEUED, J.RUNNING):
            raise InvalidTransition(f"job {job_id} is {state.value}; only a succeeded job can be re-run")
        _audit(session, "job", job_id, "rerun", by, changed)
        return JobOutcome(job=_job_view(session, job), changed=changed)


def _delivery(session: Session, delivery_id: int) -> Delivery:
    row = session.get(Delivery, delivery_id, with_for_update=True)
    if row is None:
        raise NotFound(
            f"no delivery {delivery_id}; see GET /api/v1/deliveries or `pacs-triage deliveries list`"
        )
    return row


def _delivery_view(session: Session, row: Delivery) -> DeliveryView:
    return DeliveryView.from_row(row, session.get_one(Result, row.result_id))


def _requeue_delivery(session: Session, row: Delivery, now: dt.datetime, by: str) -> None:
    row.attempts = 0
    row.run_after = now
    outbox_rows.move(session, row, D.PENDING, now, reason="retried by operator", by=by)


def retry_delivery(
    sessions: sessionmaker[Session], delivery_id: int, *, by: str, now: dt.datetime
) -> DeliveryOutcome:
    """Send a dead or cancelled delivery again with fresh attempts; a pending, sending or delivered one stays."""
    with transaction(sessions, "retrying a delivery") as session:
        row = _delivery(session, delivery_id)
        changed = D(row.state) in (D.DEAD, D.CANCELLED)
        if changed:
            _requeue_delivery(session, row, now, by)
        _audit(session, "delivery", delivery_id, "retry", by, changed)
        return DeliveryOutcome(delivery=_delivery_view(session, row), changed=changed)


def send_now(
    sessions: sessionmaker[Session], delivery_id: int, *, by: str, now: dt.datetime
) -> DeliveryOutcome:
    """Send without waiting for the backoff: a pending row becomes due now, a dead or cancelled one pending."""
    with transaction(sessions, "sending a delivery now") as session:
        row = _delivery(session, delivery_id)
        state = D(row.state)
        changed = False
        if state == D.PENDING and row.run_after > now:
            row.run_after = now
            row.updated_at = now
            changed = True
        elif state in (D.DEAD, D.CANCELLED):
            _requeue_delivery(session, row, now, by)
            changed = True
        _audit(session, "delivery", delivery_id, "send_now", by, changed)
        return DeliveryOutcome(delivery=_delivery_view(session, row), changed=changed)


def cancel_delivery(
    sessions: sessionmaker[Session], delivery_id: int, *, by: str, now: dt.datetime
) -> DeliveryOutcome:
    """Stop trying to send a pending or dead delivery."""
    with transaction(sessions, "cancelling a delivery") as session:
        row = _delivery(session, delivery_id)
        state = D(row.state)
        changed = state != D.CANCELLED
        if changed:
            if D.CANCELLED not in outbox_rows.DELIVERY_MOVES[state]:
                raise InvalidTransition(
                    f"delivery {delivery_id} is {state.value}; only pending or dead deliveries can be cancelled"
                )
            leases.clear_lease(row)
            outbox_rows.move(session, row, D.CANCELLED, now, reason="cancelled by operator", by=by)
        _audit(session, "delivery", delivery_id, "cancel", by, changed)
        return DeliveryOutcome(delivery=_delivery_view(session, row), changed=changed)


def retry_all_dead(sessions: sessionmaker[Session], *, by: str, now: dt.datetime) -> BulkOutcome:
    """Queue every dead job and every dead delivery again (one transaction)."""
    with transaction(sessions, "retrying dead jobs and deliveries") as session:
        jobs = list(
            session.scalars(select(Job).where(Job.state == J.DEAD).order_by(Job.id).with_for_update())
        )
        for job in jobs:
            _requeue_job(session, job, now, by, "bulk retry of dead items by operator")
            _audit(session, "job", job.id, "retry_all_dead", by, True)
        rows = list(
            session.scalars(
                select(Delivery).where(Delivery.state == D.DEAD).order_by(Delivery.id).with_for_update()
            )
        )
        for row in rows:
            _requeue_delivery(session, row, now, by)
            _audit(session, "delivery", row.id, "retry_all_dead", by, True)
        return BulkOutcome(jobs=[j.id for j in jobs], deliveries=[r.id for r in rows])
