"""Retention removes the files of studies delivered long ago, and never anything undelivered."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

from sqlalchemy import func, select

from storage import retention
from storage.models import Instance, JobState, Result, Series, Study, StudyState, utcnow
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.spool import Spool
from tests.support.queue_db import Clock, Db, add_job, ct_series, ingest_files, make_node


def deliver(outbox: Outbox) -> None:
    """Deliver the next due delivery, at the outbox's clock."""
    claim = outbox.claim("d")
    assert claim is not None
    assert outbox.delivered(claim, 0)


def test_purges_only_studies_delivered_before_the_cutoff(db: Db, tmp_path: Path) -> None:
    node = make_node(db, tmp_path, "PACS@127.0.0.1:104")
    old_uid, recent_uid, pending_uid = (node.produce_result() for _ in range(3))
    now = utcnow()
    deliver(Outbox(db.sessions, clock=Clock(now)))  # the oldest delivery first
    deliver(Outbox(db.sessions, clock=Clock(now + dt.timedelta(days=15))))  # the third stays pending
    files_before = {p for p in tmp_path.joinpath("home", "spool").rglob("*.dcm")}
    assert len(files_before) == 3 * 2 + 3  # two instances and one result per study

    purged = retention.run(
        db.sessions, node.spool, node.results, older_than_days=10, now=now + dt.timedelta(days=20)
    )
    assert len(purged) == 1 and purged[0].files_removed == 3
    with db.sessions() as session:
        states = dict(
            session.execute(
                select(Result.sop_instance_uid, Study.state).join(Study, Study.id == Result.study_id)
            ).all()
        )
        assert states == {
            old_uid: StudyState.PURGED,
            recent_uid: StudyState.COMPLETE,
            pending_uid: StudyState.COMPLETE,
        }
        purged_study = session.scalars(select(Study).where(Study.state == StudyState.PURGED)).one()
        assert purged_study.purged_at is not None
        assert (
            session.scalar(select(func.count()).select_from(Series).where(Series.study_id == purged_study.id))
            == 0
        )
        assert session.scalar(select(Result.path).where(Result.sop_instance_uid == old_uid)) is None
        kept_paths = set(session.scalars(select(Instance.path)))
    files_after = {p for p in tmp_path.joinpath("home", "spool").rglob("*.dcm")}
    assert len(files_after) == len(files_before) - 3
    assert {
        p.relative_to(node.spool.root).as_posix() for p in files_after if node.spool.objects in p.parents
    } == kept_paths
    # Running it again is harmless.
    assert (
        retention.run(
            db.sessions, node.spool, node.results, older_than_days=10, now=now + dt.timedelta(days=20)
        )
        == []
    )


def _study_with_files(
    db: Db, node_spool: Spool, tmp_path: Path, *, completed_at: dt.datetime
) -> tuple[int, str]:
    uid = f"2.25.{uuid.uuid4().int}"
    ingest_files(db, node_spool, ct_series(tmp_path / uid, uid, uid + ".1", 2))
    with db.sessions.begin() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study.state, study.completed_at = StudyState.COMPLETE, completed_at
        return study.id, uid


def _state_and_files(db: Db, study_id: int) -> tuple[StudyState, int]:
    with db.sessions() as session:
        state = StudyState(session.get_one(Study, study_id).state)
        files = session.scalar(
            select(func.count()).select_from(Instance).join(Series).where(Series.study_id == study_id)
        )
    return state, int(files or 0)


def test_failed_and_not_routed_studies_are_purged_after_their_period(db: Db, tmp_path: Path) -> None:
    """Issue 12 item 8: failed (and cancelled) and not-routed studies go too; dead and running ones stay."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    results = Spool(tmp_path / "results")
    results.open()
    t0 = utcnow() - dt.timedelta(days=100)
    queue = JobQueue(db.sessions, clock=Clock(t0))

    failed, _ = _study_with_files(db, spool, tmp_path, completed_at=t0)
    job = add_job(db, failed, at=t0)
    claim = queue.claim("w")
    assert claim is not None and claim.job.id == job
    assert queue.fail(claim, "NoUsableSeries: no axial series", permanent=True) is JobState.FAILED

    dead, _ = _study_with_files(db, spool, tmp_path, completed_at=t0)
    job = add_job(db, dead, at=t0, max_attempts=1)
    claim = queue.claim("w")
    assert claim is not None and claim.job.id == job
    assert queue.fail(claim, "TimeoutError", permanent=False) is JobState.DEAD

    not_routed, _ = _study_with_files(db, spool, tmp_path, completed_at=t0)
    with db.sessions.begin() as session:
        session.get_one(Study, not_routed).state = StudyState.NOT_ROUTED

    queued, _ = _study_with_files(db, spool, tmp_path, completed_at=t0)
    add_job(db, queued, at=t0)  # waiting for a worker: never purged

    periods = retention.Periods(delivered_days=7, failed_days=30, not_routed_days=7)
    # 20 days on: the not-routed study is past its 7 days, the failed one not yet past its 30.
    first = retention.run(db.sessions, spool, results, periods=periods, now=t0 + dt.timedelta(days=20))
    assert [(p.reason, p.files_removed) for p in first] == [(retention.Reason.NOT_ROUTED, 2)]
    assert _state_and_files(db, not_routed) == (StudyState.PURGED, 0)
    assert _state_and_files(db, failed) == (StudyState.COMPLETE, 2)

    second = retention.run(db.sessions, spool, results, periods=periods, now=t0 + dt.timedelta(days=40))
    assert [(p.reason, p.files_removed) for p in second] == [(retention.Reason.FAILED, 2)]
    assert _state_and_files(db, failed) == (StudyState.PURGED, 0)
    assert _state_and_files(db, dead) == (StudyState.COMPLETE, 2)  # retryable: kept
    assert _state_and_files(db, queued) == (StudyState.COMPLETE, 2)
    remaining = {p for p in spool.objects.rglob("*") if p.is_file()}
    assert len(remaining) == 4  # the dead and the queued study's two instances each

    # 0 keeps a kind for ever.
    keep = retention.Periods(delivered_days=0, failed_days=0, not_routed_days=0)
    assert retention.run(db.sessions, spool, results, periods=keep, now=t0 + dt.timedelta(days=9999)) == []


def test_retention_is_on_by_default_with_documented_periods() -> None:
    from daemon.config import Config

    r = Config().retention
    assert (r.delete_after_days, r.failed_after_days, r.not_routed_after_days) == (7.0, 30.0, 7.0)
    assert r.enabled
