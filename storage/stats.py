"""Read-only summaries for ``pacs-triage status``."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import translate_errors
from storage.models import Instance, Job, JobState, Series, Study, StudyState


@dataclass(frozen=True)
class Counts:
    studies: int
    series: int
    instances: int
    bytes_stored: int
    studies_by_state: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)


def counts(sessions: sessionmaker[Session]) -> Counts:
    with translate_errors("reading status"), sessions() as session:
        studies = session.scalar(select(func.count()).select_from(Study)) or 0
        series = session.scalar(select(func.count()).select_from(Series)) or 0
        instances, size = session.execute(
            select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
        ).one()
        by_state = {s.value: 0 for s in StudyState}
        for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
            by_state[str(state)] = n
        jobs = {s.value: 0 for s in JobState}
        for job_state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs[str(job_state)] = n
    return Counts(
        studies=studies,
        series=series,
        instances=int(instances),
        bytes_stored=int(size),
        studies_by_state=by_state,
        jobs=jobs,
    )
