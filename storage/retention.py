"""Retention: remove the spool files (instances and results) of studies that are done with, after a period.

Three kinds of study qualify, each with its own period (:class:`Periods`; 0 keeps them):

* **delivered**: the current job (the one not superseded) succeeded, produced at least one result,
  and every delivery of those results is ``delivered``, the last of them before the cut-off;
* **failed**: the current job failed for good or was cancelled, and finished before the cut-off
  (dead jobs are retryable: they stay until an operator acts);
* **not routed**: no routing rule matched, and it completed before the cut-off.

Never anything undelivered or still in progress. Rows are removed (and the study marked
``purged``) in one transaction first, files afterwards, so a crash can leave an orphan file but
never a row that points to a missing one. Jobs, results, deliveries and events stay: they are the
audit trail.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import dataclass

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction, translate_errors
from storage.events import add_event
from storage.file_records import remove_if_unnamed
from storage.models import Delivery, DeliveryState, Instance, Job, JobState, Result, Series, Study, StudyState
from storage.spool import Spool

log = logging.getLogger(__name__)


class Reason(enum.StrEnum):
    """Why a study's files were removed."""

    DELIVERED = "delivered"
    FAILED = "failed"
    NOT_ROUTED = "not_routed"


@dataclass(frozen=True, kw_only=True)
class Periods:
    """Days after which each kind of study is purged; 0 keeps that kind for ever."""

    delivered_days: float = 0.0
    failed_days: float = 0.0
    not_routed_days: float = 0.0


@dataclass(frozen=True)
class Purged:
    study_instance_uid: str
    files_removed: int
    reason: Reason = Reason.DELIVERED


@dataclass(frozen=True)
class _Cutoffs:
    delivered: dt.datetime | None
    failed: dt.datetime | None
    not_routed: dt.datetime | None

    @classmethod
    def of(cls, periods: Periods, now: dt.datetime) -> _Cutoffs:
        def cut(days: float) -> dt.datetime | None:
            return now - dt.timedelta(days=days) if days > 0 else None

        return cls(cut(periods.delivered_days), cut(periods.failed_days), cut(periods.not_routed_days))


def _current_job(session: Session, study_id: int) -> Job | None:
    return session.scalars(
        select(Job).where(Job.study_id == study_id, Job.state != JobState.SUPERSEDED).order_by(Job.id.desc())
    ).first()


def _delivered_before(session: Session, job: Job, cutoff: dt.datetime) -> bool:
    """True when ``job`` succeeded and all its results were delivered before ``cutoff``."""
    if job.state != JobState.SUCCEEDED:
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


def _reason(session: Session, study: Study, cutoffs: _Cutoffs) -> Reason | None:
    """Why ``study`` may be purged now, or None."""
    if study.state == StudyState.NOT_ROUTED:
        done = study.completed_at
        ok = cutoffs.not_routed is not None and done is not None and done < cutoffs.not_routed
        return Reason.NOT_ROUTED if ok else None
    if study.state != StudyState.COMPLETE:
        return None
    job = _current_job(session, study.id)
    if job is None:
        return None
    if cutoffs.delivered is not None and _delivered_before(session, job, cutoffs.delivered):
        return Reason.DELIVERED
    if job.state in (JobState.FAILED, JobState.CANCELLED) and cutoffs.failed is not None:
        finished = job.finished_at or job.updated_at
        return Reason.FAILED if finished < cutoffs.failed else None
    return None


def candidates(sessions: sessionmaker[Session], cutoff: dt.datetime | _Cutoffs) -> list[int]:
    """Studies that may be purged (a plain ``cutoff``: delivered ones only, as before)."""
    cutoffs = cutoff if isinstance(cutoff, _Cutoffs) else _Cutoffs(cutoff, None, None)
    clauses = []
    complete = [c for c in (cutoffs.delivered, cutoffs.failed) if c is not None]
    if complete:
        clauses.append(and_(Study.state == StudyState.COMPLETE, Study.completed_at < max(complete)))
    if cutoffs.not_routed is not None:
        clauses.append(and_(Study.state == StudyState.NOT_ROUTED, Study.completed_at < cutoffs.not_routed))
    if not clauses:
        return []
    with translate_errors("looking for studies to purge"), sessions() as session:
        studies = session.scalars(select(Study).where(or_(*clauses)).order_by(Study.id)).all()
        return [s.id for s in studies if _reason(session, s, cutoffs) is not None]


def purge(
    sessions: sessionmaker[Session],
    spool: Spool,
    results: Spool,
    study_id: int,
    *,
    cutoff: dt.datetime | _Cutoffs,
    now: dt.datetime,
) -> Purged | None:
    """Remove one study's instance and result files (re-checked under its row lock); None: not eligible."""
    cutoffs = cutoff if isinstance(cutoff, _Cutoffs) else _Cutoffs(cutoff, None, None)
    with transaction(sessions, "purging a study") as session:
        study = session.get(Study, study_id, with_for_update=True)
        reason = None if study is None else _reason(session, study, cutoffs)
        if study is None or reason is None:
            return None
        previous = study.state
        series_ids = select(Series.id).where(Series.study_id == study_id).scalar_subquery()
        paths = [
            (path, uid)
            for path, uid in session.execute(
                select(Instance.path, Instance.sop_instance_uid).where(Instance.series_id.in_(series_ids))
            )
        ]
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
            previous=str(previous),
            reason=reason.value,
            files=len(paths) + len(result_paths),
        )
        uid = study.study_instance_uid
    for path, sop_instance_uid in paths:
        # Under the instance lock, only while no row names it: a resend of the study since the
        # commit above may have recorded this very file again (storage/file_records.py).
        remove_if_unnamed(sessions, spool, path, sop_instance_uid)
    for path in result_paths:
        results.remove(path)
    return Purged(uid, len(paths) + len(result_paths), reason)


def run(
    sessions: sessionmaker[Session],
    spool: Spool,
    results: Spool,
    *,
    now: dt.datetime,
    older_than_days: float | None = None,
    periods: Periods | None = None,
) -> list[Purged]:
    """Purge every eligible study; returns what was removed.

    ``periods`` gives each kind its period; ``older_than_days`` alone purges delivered studies only.
    """
    periods = periods or Periods(delivered_days=older_than_days or 0.0)
    cutoffs = _Cutoffs.of(periods, now)
    done = []
    for study_id in candidates(sessions, cutoffs):
        purged = purge(sessions, spool, results, study_id, cutoff=cutoffs, now=now)
        if purged is not None:
            log.info(
                "retention: removed %d files of study %d (%s)", purged.files_removed, study_id, purged.reason
            )
            done.append(purged)
    return done
