"""Retention removes the files of studies delivered long ago, and never anything undelivered."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import func, select

from storage import retention
from storage.models import Instance, Result, Series, Study, StudyState, utcnow
from storage.outbox import Outbox
from tests.support.queue_db import Clock, Db, make_node


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
