"""The job queue on SQLite and PostgreSQL: order, leases, retries, dead, supersede, operator moves, audit."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from storage.db import transaction
from storage.errors import InvalidTransition, NotFound
from storage.models import Delivery, DeliveryState, Event, Job, JobState, Result
from storage.outbox import Destination, Outbox
from storage.queue import JOB_MOVES, JobQueue, NewResult, enqueue
from storage.retry import Backoff
from tests.support.queue_db import T0, Clock, Db, add_job, add_study, study_fingerprint
from vocabulary import Priority

NO_JITTER = Backoff(base_seconds=10, factor=2, max_seconds=100, jitter=0)


def queue(db: Db, clock: Clock, lease: float = 30.0) -> JobQueue:
    return JobQueue(db.sessions, lease_seconds=lease, backoff=NO_JITTER, clock=clock)


def result(uid: str) -> NewResult:
    return NewResult(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11",
        sop_instance_uid=uid,
        series_instance_uid=uid + ".1",
        path=f"objects/x/{uid}.dcm",
        size_bytes=10,
        sha256="0" * 64,
    )


def job_row(db: Db, job_id: int) -> Job:
    with db.sessions() as session:
        return session.get_one(Job, job_id)


def job_events(db: Db, job_id: int) -> list[str]:
    with db.sessions() as session:
        return list(
            session.scalars(
                select(Event.kind)
                .where(Event.entity == "job", Event.entity_id == str(job_id))
                .order_by(Event.id)
            )
        )


def test_claims_stat_first_then_oldest_and_only_when_due(db: Db, clock: Clock) -> None:
    routine_old = add_job(db, at=T0)
    urgent = add_job(db, priority=Priority.URGENT, at=T0 + dt.timedelta(seconds=1))
    routine_new = add_job(db, at=T0 + dt.timedelta(seconds=2))
    stat = add_job(db, priority=Priority.STAT, at=T0 + dt.timedelta(seconds=3))
    q = queue(db, clock)
    clock.advance(1)
    first = q.claim("w")  # only jobs created by now are due; the STAT job's run_after is later
    assert first is not None and first.job.id == urgent
    clock.advance(10)
    order = []
    while (claim := q.claim("w")) is not None:
        order.append(claim.job.id)
    assert order == [stat, routine_old, routine_new]
    assert q.claim("w") is None


def test_lease_heartbeat_and_reaper(db: Db, clock: Clock) -> None:
    job_id = add_job(db)
    q = queue(db, clock, lease=10)
    claim = q.claim("w1")
    assert claim is not None and claim.job.state is JobState.RUNNING and claim.job.attempts == 1
    clock.advance(8)
    assert q.heartbeat(claim)  # lease now runs to +18
    clock.advance(8)
    assert q.reap() == 0
    clock.advance(3)
    assert q.reap() == 1
    assert not q.heartbeat(claim), "a reaped lease must not be extendable"
    assert not q.succeed(claim, [], []), "a worker that lost its lease records nothing"
    again = q.claim("w2")
    assert again is not None and again.job.id == job_id and again.job.attempts == 2
    assert q.succeed(again, [], [])
    assert job_row(db, job_id).state == JobState.SUCCEEDED
    assert job_events(db, job_id) == ["queued", "running", "queued", "running", "succeeded"]


def test_transient_failures_back_off_then_dead(db: Db, clock: Clock) -> None:
    job_id = add_job(db, max_attempts=3)
    q = queue(db, clock)
    for attempt, delay in ((1, 10), (2, 20)):
        claim = q.claim("w")
        assert claim is not None and claim.job.attempts == attempt
        assert q.fail(claim, "OSError: disk hiccup", permanent=False) is JobState.QUEUED
        assert job_row(db, job_id).run_after == clock.now + dt.timedelta(seconds=delay)
        clock.advance(delay - 1)
        assert q.claim("w") is None, "not before its backoff"
        clock.advance(1)
    claim = q.claim("w")
    assert claim is not None
    assert q.fail(claim, "OSError: again", permanent=False) is JobState.DEAD
    row = job_row(db, job_id)
    assert row.state == JobState.DEAD and row.last_error == "OSError: again" and row.attempts == 3
    # Dead is visible and retryable by hand, with a fresh set of attempts.
    view = q.retry(job_id)
    assert view.state is JobState.QUEUED and view.attempts == 0
    assert q.claim("w") is not None


def test_permanent_error_fails_without_retry(db: Db, clock: Clock) -> None:
    job_id = add_job(db, max_attempts=5)
    q = queue(db, clock)
    claim = q.claim("w")
    assert claim is not None
    assert q.fail(claim, "NoUsableSeries: no axial CT series", permanent=True) is JobState.FAILED
    clock.advance(3600)
    assert q.claim("w") is None
    assert job_row(db, job_id).attempts == 1


def test_released_lease_does_not_count_an_attempt(db: Db, clock: Clock) -> None:
    job_id = add_job(db)
    q = queue(db, clock)
    claim = q.claim("w")
    assert claim is not None
    assert q.release(claim, reason="shutdown")
    assert not q.release(claim, reason="twice"), "a released lease is gone"
    row = job_row(db, job_id)
    assert row.state == JobState.QUEUED and row.attempts == 0 and row.lease_owner is None


def test_same_input_is_never_queued_twice(db: Db) -> None:
    study_id = add_study(db)
    fingerprint = study_fingerprint(db, study_id)
    with transaction(db.sessions, "t") as session:
        assert (
            enqueue(
                session,
                study_id=study_id,
                pipeline="noop",
                priority=Priority.ROUTINE,
                input_fingerprint=fingerprint,
                max_attempts=3,
                now=T0,
            )
            is not None
        )
    with transaction(db.sessions, "t") as session:
        assert (
            enqueue(
                session,
                study_id=study_id,
                pipeline="noop",
                priority=Priority.STAT,
                input_fingerprint=fingerprint,
                max_attempts=3,
                now=T0,
            )
            is None
        )
    with db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_new_input_supersedes_running_job_and_its_unsent_deliveries(db: Db, clock: Clock) -> None:
    study_id = add_study(db)
    old_id = add_job(db, study_id)
    q = queue(db, clock)
    running = q.claim("w1")
    assert running is not None
    add_study(db, db_uid(db, study_id), series=(("CT", 1),))  # a late series: a new input
    new_id = add_job(db, study_id)
    assert job_row(db, old_id).state == JobState.SUPERSEDED
    assert not q.heartbeat(running) and not q.succeed(running, [result("2.25.1")], [])
    claim = q.claim("w2")
    assert claim is not None and claim.job.id == new_id
    with db.sessions() as session:
        active = session.scalars(
            select(Job.id).where(Job.study_id == study_id, Job.state != JobState.SUPERSEDED)
        )
        assert list(active) == [new_id], "a study has one job that is not superseded"


def db_uid(db: Db, study_id: int) -> str:
    from storage.models import Study

    with db.sessions() as session:
        return session.get_one(Study, study_id).study_instance_uid


def test_success_records_results_and_outbox_atomically_and_supersede_cancels_unsent(
    db: Db, clock: Clock
) -> None:
    study_id = add_study(db)
    job_id = add_job(db, study_id, priority=Priority.URGENT)
    q = queue(db, clock)
    claim = q.claim("w")
    assert claim is not None
    destinations = [Destination(name="a", peer="A@h:1"), Destination(name="b", peer="B@h:2")]
    assert q.succeed(claim, [result("2.25.77")], destinations, delivery_max_attempts=4)
    with db.sessions() as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        assert [(d.destination, d.state, d.max_attempts, d.priority) for d in rows] == [
            ("a", DeliveryState.PENDING, 4, int(Priority.URGENT)),
            ("b", DeliveryState.PENDING, 4, int(Priority.URGENT)),
        ]
        seen = session.scalars(select(Result.input_fingerprint)).one()
    assert seen == job_row(db, job_id).input_fingerprint, "the result records the input it saw"
    outbox = Outbox(db.sessions, clock=clock)
    sending = outbox.claim("d")
    assert sending is not None and sending.delivery.destination == "a"
    add_study(db, db_uid(db, study_id), series=(("CT", 1),))
    add_job(db, study_id)
    with db.sessions() as session:
        states = dict(session.execute(select(Delivery.destination, Delivery.state)).all())
    assert states == {"a": DeliveryState.SENDING, "b": DeliveryState.CANCELLED}


def test_operator_cancel_and_retry_follow_the_state_machine(db: Db, clock: Clock) -> None:
    job_id = add_job(db)
    q = queue(db, clock)
    claim = q.claim("w")
    assert claim is not None
    assert q.cancel(job_id).state is JobState.CANCELLED
    assert not q.succeed(claim, [], []), "a cancelled job's worker drops its result"
    assert q.retry(job_id).state is JobState.QUEUED
    claim = q.claim("w")
    assert claim is not None and q.succeed(claim, [], [])
    with pytest.raises(InvalidTransition, match="only failed, dead or cancelled"):
        q.retry(job_id)
    with pytest.raises(InvalidTransition, match="cannot become cancelled"):
        q.cancel(job_id)
    with pytest.raises(NotFound, match="jobs list"):
        q.get(10_000)
    assert [e.kind for e in q.history(job_id)] == [
        "queued",
        "running",
        "cancelled",
        "queued",
        "running",
        "succeeded",
    ]


def test_every_recorded_move_is_allowed(db: Db, clock: Clock) -> None:
    import json

    test_transient_failures_back_off_then_dead(db, clock)
    with db.sessions() as session:
        for kind, detail in session.execute(select(Event.kind, Event.detail).where(Event.entity == "job")):
            previous = json.loads(detail).get("previous") if detail else None
            if previous is not None:
                assert JobState(kind) in JOB_MOVES[JobState(previous)], (previous, kind)


def test_outbox_retries_with_backoff_reaps_and_dies(db: Db, clock: Clock) -> None:
    q = queue(db, clock)
    add_job(db)
    claim = q.claim("w")
    assert claim is not None
    assert q.succeed(
        claim, [result("2.25.88")], [Destination(name="pacs", peer="P@h:1")], delivery_max_attempts=3
    )
    outbox = Outbox(db.sessions, lease_seconds=10, backoff=NO_JITTER, clock=clock)
    first = outbox.claim("d")
    assert first is not None and first.delivery.attempts == 1
    assert outbox.failed(first, "connection refused") is DeliveryState.PENDING
    assert outbox.claim("d") is None, "not before its backoff"
    clock.advance(10)
    second = outbox.claim("d")
    assert second is not None
    clock.advance(11)
    assert outbox.reap() == 1, "a dispatcher that died mid-send gives the row back"
    assert not outbox.delivered(second, 0), "an expired lease records nothing"
    third = outbox.claim("d")
    assert third is not None and third.delivery.attempts == 3
    assert outbox.failed(third, "A700", status=0xA700) is DeliveryState.DEAD
    assert [d.state for d in outbox.recent([DeliveryState.DEAD])] == [DeliveryState.DEAD]
    outbox.retry(third.delivery.id)
    again = outbox.claim("d")
    assert again is not None and outbox.delivered(again, 0)
    view = outbox.for_job(claim.job.id)[0]
    assert (view.state, view.attempts, view.last_status) == (DeliveryState.DELIVERED, 1, 0)
