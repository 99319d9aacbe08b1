"""Retention: remove the spool files (instances and results) of studies whose results were delivered long enough ago.

Never anything undelivered: a study qualifies only when its current job (the one not
superseded) succeeded, produced at least one result, and every delivery of those results is
``delivered``, the last of them before the cut-off. Rows are removed (and the study marked
``purged``) in one transaction first, files afterwards, so a crash can leave an orphan file
but never a row that points to a missing one. Jobs, results, deliveries and events stay: they
are the audit trail.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction, translate_errors
from storage.events import add_event
from storage.models import Delivery, DeliveryState, Instance, Job, JobState, Result, Series, Study, StudyState
from storage.spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Purged:
    study_instance_uid: str
    files_removed: int


def _delivered_before(session: Session, study_id: int, cutoff: dt.datetime) -> bool:
    """True when the study's current job succeeded and all its results were delivered before ``cutoff``."""
    job = session.scalars(
        select(Job).where(Job.study_id == study_id, Job.state != JobState.SUPERSEDED).order_by(Job.id.desc())
    ).first()
    if job is None or job.state != JobState.SUCCEEDED:
        return False
    rows = session.execute(
        select(Delivery.state, Delivery.delivered_at)
        .select_from(Result)
        .outerjoin(Delivery, Delivery.result_id == Result.id)
        .where(Result.job_id == job.id)
    ).all()
    # A result without any delivery (no destination) joins as (None, None): not delivered.
    return bool(rows) and all(
        state == DeliveryState.DELIVERED and at is not None and at < cutoff for state, at in rows
    )


def candidates(sessions: sessionmaker[Session], cutoff: dt.datetime) -> list[int]:
    """Complete studies whose results were all delivered before ``cutoff``."""
    with translate_errors("looking for studies to purge"), sessions() as session:
        study_ids = session.scalars(
            select(Study.id).where(Study.state == StudyState.COMPLETE, Study.completed_at < cutoff)
        ).all()
        return [study_id for study_id in study_ids if _delivered_before(session, study_id, cutoff)]


def purge(
    sessions: sessionmaker[Session],
    spool: Spool,
    results: Spool,
    study_id: int,
    *,
    cutoff: dt.datetime,
    now: dt.datetime,
) -> Purged | None:
    """Remove one study's instance and result files (re-checked under its row lock); None: not eligible."""
    with transaction(sessions, "purging a study") as session:
        study = session.get(Study, study_id, with_for_update=True)
        if (
            study is None
            or study.state != StudyState.COMPLETE
            or not _delivered_before(session, study_id, cutoff)
        ):
            return None
        series_ids = select(Series.id).where(Series.study_id == study_id).scalar_subquery()
        paths = list(session.scalars(select(Instance.path).where(Instance.series_id.in_(series_ids))))
        result_paths = []
        for result in session.scalars(
            select(Result).where(Result.study_id == study_id, Result.path.is_not(None))
        ):
            assert result.path is not None
            result_paths.append(result.path)
            result.path = None
        session.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
        session.execute(delete(Series).where(Series.study_id == study_id))
        study.state = StudyState.PURGED
        study.purged_at = now
        add_event(
            session,
            "study",
            study.id,
            "purged",
            previous=StudyState.COMPLETE.value,
            files=len(paths) + len(result_paths),
            cutoff=cutoff.isoformat(),
        )
        uid = study.study_instance_uid
    for path in paths:
        spool.remove(path)
    for path in result_paths:
        results.remove(path)
    return Purged(uid, len(paths) + len(result_paths))


def run(
    sessions: sessionmaker[Session], spool: Spool, results: Spool, *, older_than_days: float, now: dt.datetime
) -> list[Purged]:
    """Purge every eligible study; returns what was removed."""
    cutoff = now - dt.timedelta(days=older_than_days)
    done = []
    for study_id in candidates(sessions, cutoff):
        purged = purge(sessions, spool, results, study_id, cutoff=cutoff, now=now)
        if purged is not None:
            log.info("retention: removed %d files of study %d", purged.files_removed, study_id)
            done.append(purged)
    return done
