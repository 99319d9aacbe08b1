"""What a new report supersedes: the results of a study's earlier jobs that already reached a
destination (the PACS holds them; the new SR names them as its predecessors)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import translate_errors
from storage.models import Delivery, DeliveryState, Result, Study


@dataclass(frozen=True, kw_only=True)
class DeliveredResult:
    """A result of an earlier job of the study that reached at least one destination."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def delivered_results(
    sessions: sessionmaker[Session], study_id: int, *, besides_job: int
) -> list[DeliveredResult]:
    """Results of the study's other jobs that a destination accepted: what a new report supersedes."""
    with translate_errors("reading the delivered results of a study"), sessions() as session:
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Result.series_instance_uid,
                Result.sop_class_uid,
                Result.sop_instance_uid,
            )
            .join(Study, Study.id == Result.study_id)
            .where(
                Result.study_id == study_id,
                Result.job_id != besides_job,
                exists().where(Delivery.result_id == Result.id, Delivery.state == DeliveryState.DELIVERED),
            )
            .order_by(Result.id)
        ).all()
    return [
        DeliveredResult(study_instance_uid=a, series_instance_uid=b, sop_class_uid=c, sop_instance_uid=d)
        for a, b, c, d in rows
    ]
