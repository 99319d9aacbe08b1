"""The durable job queue: one analysis job per study input, claimed under leases, retried with backoff.

    queued ──claim──▶ running ──▶ succeeded            (results + outbox rows, one transaction)
      ▲                  │  └──▶ failed                (permanent error: the same input fails again)
      ├──── backoff ─────┤ (transient error while attempts remain; lease expired; lease given back)
      │                  └─────▶ dead                  (attempts exhausted; retryable by hand)
      └── operator retry ◀── failed, dead, cancelled
    queued/running/failed/dead ──▶ cancelled (operator)
    any but superseded ──▶ superseded (late instances gave the study a new input fingerprint)

A study has at most one job that is not superseded: :func:`enqueue` supersedes the older ones in
the same transaction that queues the new one. The input fingerprint is unique, so the same input
is never queued twice. Claiming, heartbeats, retries and reaping are the leased-row mechanism of
``storage/leases.py``; the retry policy is ``storage/retry.py``; the audit ``storage/events.py``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage import events
from storage.db import transaction, translate_errors
from storage.events import EventView, add_event
from storage.leases import LeasedTable, Leases
from storage.models import Job, JobState, Result, Study, utcnow
from storage.outbox import Destination, add_deliveries, cancel_for_job
from storage.retry import Backoff
from vocabulary import Priority

log = logging.getLogger(__name__)

S = JobState
JOB_MOVES: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.SUPERSEDED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.DEAD, S.QUEUED, S.CANCELLED, S.SUPERSEDED}),
    S.SUCCEEDED: frozenset({S.SUPERSEDED}),
    S.FAILED: frozenset({S.QUEUED, S.CANCELLED, S.SUPERSEDED}),
    S.DEAD: frozenset({S.QUEUED, S.CANCELLED, S.SUPERSEDED}),
    S.CANCELLED: frozenset({S.QUEUED, S.SUPERSEDED}),
    S.SUPERSEDED: frozenset(),
}
FINISHED = frozenset({S.SUCCEEDED, S.FAILED, S.DEAD, S.CANCELLED, S.SUPERSEDED})
RETRYABLE = (S.FAILED, S.DEAD, S.CANCELLED)  # an operator may queue these again


def _stamp_finished(job: Job, to: JobState, now: dt.datetime) -> None:
    if to in FINISHED:
        job.finished_at = now


JOBS: LeasedTable[Job, JobState] = LeasedTable(
    model=Job,
    entity="job",
    plural="jobs",
    states=JobState,
    moves=JOB_MOVES,
    ready=S.QUEUED,
    running=S.RUNNING,
    failed=S.FAILED,
    dead=S.DEAD,
    retryable=RETRYABLE,
    holder="worker",
    list_command="pacs-triage jobs list",
    max_error_chars=4000,
    on_move=_stamp_finished,
)


def move(session: Session, job: Job, to: JobState, now: dt.datetime, **detail: object) -> None:
    """Change a job's state, refusing moves :data:`JOB_MOVES` does not allow; audit it."""
    JOBS.move(session, job, to, now, **detail)


@dataclass(frozen=True, kw_only=True)
class JobView:
    """A job as workers and operators see it (a snapshot; the row may move on)."""

    id: int
    study_id: int
    study_instance_uid: str
    pipeline: str
    rule: str | None
    priority: Priority
    state: JobState
    input_fingerprint: str
    attempts: int
    max_attempts: int
    run_after: dt.datetime
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    last_error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, job: Job, study_instance_uid: str) -> JobView:
        return cls(
            id=job.id,
            study_id=job.study_id,
            study_instance_uid=study_instance_uid,
            pipeline=job.pipeline,
            rule=job.rule,
            priority=Priority(job.priority),
            state=JobState(job.state),
            input_fingerprint=job.input_fingerprint,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            run_after=job.run_after,
            lease_owner=job.lease_owner,
            lease_expires_at=job.lease_expires_at,
            last_error=job.last_error,
            created_at=job.created_at,
            updated_at=job.updated_at,
            finished_at=job.finished_at,
        )

    @classmethod
    def load(cls, session: Session, job: Job) -> JobView:
        """The view of ``job``, with its study's UID read in ``session``."""
        uid = session.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id))
        return cls.from_row(job, uid or "")


@dataclass(frozen=True)
class Claim:
    """A job held by one worker under the lease ``owner``."""

    job: JobView
    owner: str


@dataclass(frozen=True, kw_only=True)
class NewResult:
    """A result object a worker wrote to the spool, to be recorded with the job's success."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str  # relative to the spool root
    size_bytes: int
    sha256: str
    priority: int = 0
    summary: str = ""


def enqueue(
    session: Session,
    *,
    study_id: int,
    pipeline: str,
    priority: Priority,
    input_fingerprint: str,
    max_attempts: int,
    now: dt.datetime,
    rule: str | None = None,
) -> Job | None:
    """Queue a job for this input (in the caller's transaction), superseding the study's older jobs.

    Returns None when a job for the same fingerprint already exists: the same input is never
    queued twice.
    """
    if session.scalar(select(Job.id).where(Job.input_fingerprint == input_fingerprint)) is not None:
        return None
    job = Job(
        study_id=study_id,
        pipeline=pipeline,
        priority=int(priority),
        state=S.QUEUED,
        input_fingerprint=input_fingerprint,
        attempts=0,
        max_attempts=max_attempts,
        run_after=now,
        rule=rule,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    add_event(
        session,
        "job",
        job.id,
        S.QUEUED.value,
        study_id=study_id,
        pipeline=pipeline,
        rule=rule,
        priority=Priority(priority).name,
        input_fingerprint=input_fingerprint,
    )
    older = session.scalars(
        select(Job)
        .where(Job.study_id == study_id, Job.id != job.id, Job.state != S.SUPERSEDED)
        .with_for_update()
    ).all()
    for old in older:
        # A running job's worker will find its lease gone and drop its result.
        JOBS.revoke(session, old, S.SUPERSEDED, now, by_job=job.id)
        cancel_for_job(session, old.id, now, reason=f"result superseded by job {job.id}")
    return job


class JobQueue:
    """Claims and settles jobs. All times come from ``clock`` (UTC)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        lease_seconds: float = 60.0,
        backoff: Backoff | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.leases = Leases(
            sessions, JOBS, lease_seconds=lease_seconds, backoff=backoff or Backoff(), clock=clock
        )

    # -- worker side ---------------------------------------------------------------------------

    def claim(self, worker: str) -> Claim | None:
        """The next due job (STAT first, then oldest), leased to ``worker``; None when none is due."""
        claimed = self.leases.claim(worker, JobView.load)
        return None if claimed is None else Claim(*claimed)

    def heartbeat(self, claim: Claim) -> bool:
        """Extend the lease; False when it is no longer ours (reaped, cancelled or superseded)."""
        return self.leases.heartbeat(claim.job.id, claim.owner)

    def succeed(
        self,
        claim: Claim,
        results: Sequence[NewResult],
        destinations: Sequence[Destination],
        *,
        delivery_max_attempts: int = 10,
        stage_seconds: Mapping[str, float] | None = None,
        peak_rss_bytes: int | None = None,
    ) -> bool:
        """Record the results and their outbox rows with the job's success, atomically.

        ``stage_seconds`` (the pipeline's time per stage) and ``peak_rss_bytes`` (the worker's peak
        resident memory during the run) go into the audit row of the success.

        False (and nothing written) when the lease was lost meanwhile: another worker owns the job
        now, or it was cancelled or superseded.
        """

        def record(session: Session, job: Job, now: dt.datetime) -> bool:
            rows = [_result_row(job, new, now) for new in results]
            session.add_all(rows)
            session.flush()
            queued = 0
            for row in rows:
                add_event(
                    session, "result", row.id, "created", job_id=job.id, sop_instance_uid=row.sop_instance_uid
                )
                queued += len(
                    add_deliveries(
                        session,
                        row,
                        destinations,
                        priority=max(row.priority, job.priority),
                        max_attempts=delivery_max_attempts,
                        now=now,
                    )
                )
            stages: dict[str, object] = (
                {"stages": {k: round(v, 3) for k, v in stage_seconds.items()}} if stage_seconds else {}
            )
            if peak_rss_bytes is not None:
                stages["peak_rss_mib"] = round(peak_rss_bytes / 2**20, 1)
            move(
                session,
                job,
                S.SUCCEEDED,
                now,
                attempt=job.attempts,
                results=len(rows),
                deliveries=queued,
                **stages,
            )
            return True

        return self.leases.settle(claim.job.id, claim.owner, "recording a job's results", record) or False

    def fail(self, claim: Claim, error: str, *, permanent: bool) -> JobState | None:
        """Record a failed attempt: failed (permanent), queued after a backoff, or dead.

        Returns the new state, or None when the lease was lost meanwhile.
        """
        return self.leases.fail(claim.job.id, claim.owner, error, permanent=permanent)

    def release(self, claim: Claim, *, reason: str, delay_seconds: float = 0.0) -> bool:
        """Give the lease back without counting the attempt (shutdown, input changed)."""
        return self.leases.release(claim.job.id, claim.owner, reason=reason, delay_seconds=delay_seconds)

    # -- maintenance ---------------------------------------------------------------------------

    def reap(self) -> int:
        """Requeue jobs whose lease expired (worker killed or hung), or mark them dead; returns how many."""
        return self.leases.reap()

    # -- operator ------------------------------------------------------------------------------

    def retry(self, job_id: int) -> JobView:
        """Queue a failed, dead or cancelled job again with a fresh set of attempts."""
        return self.leases.retry(job_id, JobView.load)

    def cancel(self, job_id: int) -> JobView:
        """Cancel a job that has not succeeded; a running one's worker drops its result."""
        with transaction(self.sessions, "cancelling a job") as session:
            job = JOBS.get(session, job_id, lock=True)
            JOBS.revoke(session, job, S.CANCELLED, self.clock(), reason="cancelled by operator")
            return JobView.load(session, job)

    def get(self, job_id: int) -> JobView:
        with translate_errors("reading a job"), self.sessions() as session:
            return JobView.load(session, JOBS.get(session, job_id))

    def recent(self, states: Sequence[JobState] = (), limit: int = 50) -> list[JobView]:
        """Jobs, newest first, optionally only those in ``states``."""
        query = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
        if states:
            query = query.where(Job.state.in_(list(states)))
        query = query.order_by(Job.id.desc()).limit(limit)
        with translate_errors("listing jobs"), self.sessions() as session:
            return [JobView.from_row(job, uid) for job, uid in session.execute(query)]

    def history(self, job_id: int) -> list[EventView]:
        """The audit trail of a job, oldest first."""
        with translate_errors("reading a job's history"), self.sessions() as session:
            return events.history(session, "job", job_id)


def _result_row(job: Job, new: NewResult, now: dt.datetime) -> Result:
    return Result(
        job_id=job.id,
        study_id=job.study_id,
        input_fingerprint=job.input_fingerprint,
        sop_class_uid=new.sop_class_uid,
        sop_instance_uid=new.sop_instance_uid,
        series_instance_uid=new.series_instance_uid,
        path=new.path,
        size_bytes=new.size_bytes,
        sha256=new.sha256,
        priority=new.priority,
        summary=new.summary,
        created_at=now,
    )
