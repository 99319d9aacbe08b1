"""When is a study complete? DICOM has no "study finished" message (DESIGN.md, "Completion and routing").

A study in ``receiving`` becomes complete when

* every association that last delivered one of its series has been **released** and a quiet
  period has passed since the later of that release and the last instance received; or
* no instance has arrived for the **idle timeout** and no association that delivered to it is
  still open (it was aborted or lost). An open association holds the study, so a sender that
  pauses does not get a report on half a study; only when it has been silent for
  ``open_association_timeout_seconds`` (longer than the receiver lets an association sit idle:
  its receiver must have died) does the idle timeout apply again.

Completion happens in two steps so no file is read while the database is locked:
:func:`snapshot` reads what the study holds; the caller routes it (``daemon/service/routing.py`` reads a
header per series); :func:`complete` then re-checks, under the study's row lock, that nothing
arrived in between (same content digest) before it records the decision and queues the job.

The input fingerprint of a job is a hash of the pipeline name and every instance (SOP Instance
UID and content sha256) of the study: a late or replaced instance gives a new fingerprint, and
the new job supersedes the old one (``storage/queue.py``), so a study is never split into
unrelated jobs.

Objects we created never become an analysis input: an instance whose SOP Instance UID is one of
our results (a PACS sending the study back with our SR and SEG in it) is stored but left out of
the routing facts, the content digest and the worker's input. The study's fingerprint is then
unchanged, so it gets no new job and no second report.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction, translate_errors
from storage.errors import NotFound
from storage.events import add_event
from storage.models import Association, Instance, Result, Series, Study, StudyState
from storage.queue import enqueue
from vocabulary import Priority

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CompletionPolicy:
    """Timings of completion, in seconds."""

    quiet_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    # An association still open holds its study until it has been silent this long (None: forever).
    open_association_timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.quiet_seconds <= self.idle_timeout_seconds:
            raise ValueError(
                f"need 0 <= quiet_seconds ({self.quiet_seconds}) <= idle_timeout_seconds "
                f"({self.idle_timeout_seconds})"
            )


@dataclass(frozen=True)
class AssociationEnd:
    """How the association that last delivered a series ended (``ended_at`` None: still open)."""

    ended_at: dt.datetime | None
    released: bool


class CompletionReason(enum.StrEnum):
    RELEASED = "released"  # associations released and the quiet period passed
    IDLE = "idle_timeout"  # nothing arrived for the idle timeout
    FORCED = "forced"  # an operator ran `pacs-triage studies complete`


def decide(
    last_received_at: dt.datetime,
    associations: Sequence[AssociationEnd],
    policy: CompletionPolicy,
    now: dt.datetime,
) -> CompletionReason | None:
    """Whether a receiving study is complete at ``now``, and why; None: keep waiting."""
    silent = now - last_received_at
    if any(a.ended_at is None for a in associations):
        limit = policy.open_association_timeout_seconds
        if limit is not None and silent >= dt.timedelta(seconds=max(limit, policy.idle_timeout_seconds)):
            return CompletionReason.IDLE  # its receiver is gone: no one will end that association
        return None
    if silent >= dt.timedelta(seconds=policy.idle_timeout_seconds):
        return CompletionReason.IDLE
    if not associations or not all(a.released and a.ended_at is not None for a in associations):
        return None
    quiet_from = max([last_received_at, *(a.ended_at for a in associations if a.ended_at is not None)])
    if now - quiet_from >= dt.timedelta(seconds=policy.quiet_seconds):
        return CompletionReason.RELEASED
    return None


@dataclass(frozen=True, kw_only=True)
class SeriesFacts:
    """What routing may look at for one series (attributes read from files come from ``sample_path``)."""

    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    instance_count: int
    calling_aes: tuple[str, ...]
    sample_path: str  # one instance of the series, relative to the spool root


@dataclass(frozen=True, kw_only=True)
class StudySnapshot:
    study_id: int
    study_instance_uid: str
    series: tuple[SeriesFacts, ...]
    content_digest: str  # hash of every (SOP Instance UID, sha256) of the study


@dataclass(frozen=True, kw_only=True)
class Route:
    """Routing matched ``rule``: run ``pipeline`` at ``priority``."""

    rule: str
    pipeline: str
    priority: Priority
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class NoRoute:
    """No routing rule matched; ``detail`` says why, for ``pacs-triage status``."""

    detail: str


@dataclass(frozen=True, kw_only=True)
class Completed:
    """What :func:`complete` did: the study's new state and the job queued (None: none new)."""

    study_instance_uid: str
    state: StudyState | None  # None: skipped (not due any more, or changed since the snapshot)
    job_id: int | None = None
    note: str = ""


def digest_of(instances: Iterable[tuple[str, str]]) -> str:
    """Order-independent hash of (SOP Instance UID, content sha256) pairs."""
    digest = hashlib.sha256(b"pacs-triage/study-content/v1\n")
    for sop_uid, sha256 in sorted(instances):
        digest.update(f"{sop_uid}:{sha256}\n".encode("ascii"))
    return digest.hexdigest()


def input_fingerprint(pipeline: str, content_digest: str) -> str:
    """The job identity: the same study content routed to the same pipeline is the same input."""
    return hashlib.sha256(f"pacs-triage/job-input/v1\n{pipeline}\n{content_digest}".encode()).hexdigest()


def analysable() -> ColumnElement[bool]:
    """Instances that may be analysis input: not one of our own results sent back to us."""
    return ~exists().where(Result.sop_instance_uid == Instance.sop_instance_uid)


def content_digest(session: Session, study_id: int) -> str:
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.sha256)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id, analysable())
    )
    return digest_of(rows)


@dataclass(frozen=True)
class Due:
    study_id: int
    study_instance_uid: str
    reason: CompletionReason


def due_studies(sessions: sessionmaker[Session], policy: CompletionPolicy, now: dt.datetime) -> list[Due]:
    """Receiving studies that are complete at ``now``."""
    with translate_errors("looking for complete studies"), sessions() as session:
        receiving = session.execute(
            select(Study.id, Study.study_instance_uid, Study.last_received_at).where(
                Study.state == StudyState.RECEIVING
            )
        ).all()
        ends = _association_ends(session, [study_id for study_id, _, _ in receiving])
    due = []
    for study_id, uid, last_received_at in receiving:
        reason = decide(last_received_at, ends.get(study_id, []), policy, now)
        if reason is not None:
            due.append(Due(study_id, uid, reason))
    return due


def _association_ends(session: Session, study_ids: list[int]) -> dict[int, list[AssociationEnd]]:
    ends: dict[int, list[AssociationEnd]] = {}
    if not study_ids:
        return ends
    rows = session.execute(
        select(Series.study_id, Association.ended_at, Association.released)
        .outerjoin(Association, Association.id == Series.last_association_id)
        .where(Series.study_id.in_(study_ids))
    )
    for study_id, ended_at, released in rows:
        # No association row (deleted): treat it as ended without a release; the idle timeout decides.
        ends.setdefault(study_id, []).append(
            AssociationEnd(ended_at, bool(released) and ended_at is not None)
        )
    return ends


def find_study(sessions: sessionmaker[Session], study_instance_uid: str) -> int:
    with translate_errors("finding a study"), sessions() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_instance_uid))
    if study_id is None:
        raise NotFound(f"no study {study_instance_uid} has been received; check the UID")
    return study_id


def snapshot(sessions: sessionmaker[Session], study_id: int) -> StudySnapshot:
    """What the study holds now, for routing."""
    with translate_errors("reading a study for routing"), sessions() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise NotFound(f"no study with id {study_id}")
        counts = dict(
            session.execute(
                select(Instance.series_id, func.count())
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == study_id, analysable())
                .group_by(Instance.series_id)
            ).all()
        )
        facts = []
        for series in session.scalars(select(Series).where(Series.study_id == study_id).order_by(Series.id)):
            if not counts.get(series.id):
                continue
            aes = session.scalars(
                select(Instance.calling_ae).where(Instance.series_id == series.id, analysable()).distinct()
            ).all()
            sample = session.scalar(
                select(Instance.path)
                .where(Instance.series_id == series.id, analysable())
                .order_by(Instance.id)
                .limit(1)
            )
            assert sample is not None
            facts.append(
                SeriesFacts(
                    series_instance_uid=series.series_instance_uid,
                    modality=series.modality,
                    body_part_examined=series.body_part_examined,
                    series_description=series.series_description,
                    series_number=series.series_number,
                    instance_count=counts[series.id],
                    calling_aes=tuple(sorted(aes)),
                    sample_path=sample,
                )
            )
        return StudySnapshot(
            study_id=study_id,
            study_instance_uid=study.study_instance_uid,
            series=tuple(facts),
            content_digest=content_digest(session, study_id),
        )


def complete(
    sessions: sessionmaker[Session],
    snap: StudySnapshot,
    decision: Route | NoRoute,
    *,
    reason: CompletionReason,
    policy: CompletionPolicy,
    max_attempts: int,
    now: dt.datetime,
) -> Completed:
    """Record the study as complete (or not routed) and queue its job, if nothing changed since ``snap``."""
    uid = snap.study_instance_uid
    with transaction(sessions, "completing a study") as session:
        study = session.get(Study, snap.study_id, with_for_update=True)
        if study is None:
            return Completed(study_instance_uid=uid, state=None, note="study no longer exists")
        if study.state == StudyState.PURGED:
            return Completed(study_instance_uid=uid, state=None, note="its files were removed by retention")
        if reason is not CompletionReason.FORCED:
            if study.state != StudyState.RECEIVING:
                return Completed(study_instance_uid=uid, state=None, note=f"already {study.state}")
            if (
                decide(
                    study.last_received_at,
                    _association_ends(session, [study.id]).get(study.id, []),
                    policy,
                    now,
                )
                is None
            ):
                return Completed(study_instance_uid=uid, state=None, note="instances arrived meanwhile")
        if content_digest(session, study.id) != snap.content_digest:
            return Completed(study_instance_uid=uid, state=None, note="instances arrived meanwhile")
        previous = study.state
        study.completed_at = now
        study.completed_received_at = study.last_received_at
        if isinstance(decision, NoRoute):
            study.state = StudyState.NOT_ROUTED
            study.route_rule = None
            study.route_detail = decision.detail
            add_event(
                session,
                "study",
                study.id,
                "not_routed",
                previous=previous,
                reason=reason.value,
                detail=decision.detail,
            )
            return Completed(study_instance_uid=uid, state=StudyState.NOT_ROUTED, note=decision.detail)
        study.state = StudyState.COMPLETE
        study.route_rule = decision.rule
        study.route_detail = decision.detail
        add_event(
            session,
            "study",
            study.id,
            "complete",
            previous=previous,
            reason=reason.value,
            rule=decision.rule,
            pipeline=decision.pipeline,
        )
        job = enqueue(
            session,
            study_id=study.id,
            pipeline=decision.pipeline,
            priority=decision.priority,
            input_fingerprint=input_fingerprint(decision.pipeline, snap.content_digest),
            max_attempts=max_attempts,
            now=now,
            rule=decision.rule,
        )
        note = "" if job is not None else "this input was already queued"
        return Completed(
            study_instance_uid=uid,
            state=StudyState.COMPLETE,
            job_id=job.id if job is not None else None,
            note=note,
        )


def reopen_raced(sessions: sessionmaker[Session], now: dt.datetime) -> list[str]:
    """Reopen complete studies that recorded an instance after completion looked at them.

    On PostgreSQL a store that read the study just before it was completed may commit just
    after, without reopening it; its write to ``last_received_at`` gives it away. Returns the
    UIDs reopened (the next sweep completes them again, with the new input).
    """
    with transaction(sessions, "reopening studies that raced completion") as session:
        studies = session.scalars(
            select(Study)
            .where(
                Study.state.in_([StudyState.COMPLETE, StudyState.NOT_ROUTED]),
                Study.completed_received_at.is_not(None),
                Study.last_received_at != Study.completed_received_at,
            )
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            add_event(
                session,
                "study",
                study.id,
                "reopened",
                previous=study.state,
                reason="an instance was recorded while the study was being completed",
            )
            study.state = StudyState.RECEIVING
            study.completed_at = None
        return [study.study_instance_uid for study in studies]


@dataclass(frozen=True)
class StudyInput:
    """The files a worker hands to a pipeline, and the digest of exactly that content."""

    paths: tuple[str, ...]  # relative to the spool root, ordered by series then instance
    content_digest: str


def study_input(sessions: sessionmaker[Session], study_id: int) -> StudyInput:
    with translate_errors("reading a study's files"), sessions() as session:
        rows = session.execute(
            select(Instance.path, Instance.sop_instance_uid, Instance.sha256)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study_id, analysable())
            .order_by(Series.id, Instance.id)
        ).all()
    return StudyInput(tuple(path for path, _, _ in rows), digest_of((uid, sha) for _, uid, sha in rows))
