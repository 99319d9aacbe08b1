"""Recording one received instance the full way: association, study, series and instance rows.

``storage.ingest`` takes this path for an instance of a series it has not recorded before, a
duplicate, a replacement, a reopened study or an identity conflict; new instances of a known
series take its fast path instead (three statements, group-committed). Both run under the
instance lock (storage/file_records.py).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.errors import IdentityConflict
from storage.events import add_event  # the audit log's one API
from storage.file_records import Placement, lock_instance
from storage.identity import Patient, patient_conflict
from storage.models import Association, Instance, Series, Study, StudyState
from storage.receipt import AssociationInfo

__all__ = ["AssociationInfo", "IncomingInstance", "Recorded", "StoreOutcome", "record_in"]


class StoreOutcome(enum.StrEnum):
    STORED = "stored"  # a new instance
    DUPLICATE = "duplicate"  # identical bytes were already stored: nothing new
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: replaced, series marked changed


@dataclass(frozen=True)
class IncomingInstance:
    """The validated identifying attributes of one received instance."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    series_number: int | None = None


@dataclass(frozen=True)
class Recorded:
    outcome: StoreOutcome
    old_path: str | None  # the replaced file, to remove once the new row is committed
    study_id: int
    series_id: int
    patient: Patient | None = None  # the study's (Patient ID, issuer), if read


def patient_of(incoming: IncomingInstance) -> Patient:
    return incoming.patient_id, incoming.issuer_of_patient_id


def record_in(
    session: Session,
    incoming: IncomingInstance,
    placement: Placement,
    size: int,
    sha256: str,
    association: AssociationInfo,
    received_at: dt.datetime,
) -> Recorded:
    # The instance lock first, while this transaction holds nothing else (no lock cycles).
    lock_instance(session.connection(), placement.uid_hash)
    placement.ensure()
    rel = placement.relative_path
    if session.get(Association, association.id) is None:
        session.add(
            Association(
                id=association.id,
                calling_ae=association.calling_ae,
                called_ae=association.called_ae,
                source_address=association.source_address,
                started_at=association.started_at,
            )
        )
    same = identical(session, incoming, sha256)
    if same is not None:
        # An identical resend (the PACS sending a study again, our own results coming back)
        # changes nothing: the study is not reopened and its completion clock not reset.
        return Recorded(StoreOutcome.DUPLICATE, None, *same)
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == incoming.study_instance_uid)
    ).one_or_none()
    if study is None:
        study = Study(
            study_instance_uid=incoming.study_instance_uid,
            patient_id=incoming.patient_id,
            issuer_of_patient_id=incoming.issuer_of_patient_id,
            accession_number=incoming.accession_number,
            state=StudyState.RECEIVING,
            first_received_at=received_at,
            last_received_at=received_at,
        )
        session.add(study)
        session.flush()
        add_event(session, "study", study.id, "created", calling_ae=association.calling_ae)
    else:
        conflict = patient_conflict((study.patient_id, study.issuer_of_patient_id), patient_of(incoming))
        if conflict is not None:
            raise IdentityConflict(
                f"identity conflict: {conflict} {incoming.study_instance_uid} (never merged)",
                study_id=study.id,
            )
        study.last_received_at = received_at
        if study.state != StudyState.RECEIVING:
            add_event(
                session,
                "study",
                study.id,
                "reopened",
                previous=study.state,
                sop_instance_uid=incoming.sop_instance_uid,
            )
            study.state = StudyState.RECEIVING
            study.completed_at = None

    series = session.scalars(
        select(Series).where(Series.series_instance_uid == incoming.series_instance_uid)
    ).one_or_none()
    if series is None:
        series = Series(
            study_id=study.id,
            series_instance_uid=incoming.series_instance_uid,
            modality=incoming.modality,
            body_part_examined=incoming.body_part_examined,
            series_description=incoming.series_description,
            series_number=incoming.series_number,
            last_received_at=received_at,
        )
        session.add(series)
        session.flush()
    elif series.study_id != study.id:
        raise IdentityConflict(
            f"identity conflict: series {incoming.series_instance_uid} is in another study",
            study_id=series.study_id,
        )
    series.last_received_at = received_at
    series.last_association_id = association.id

    instance = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == incoming.sop_instance_uid)
    ).one_or_none()
    patient = (study.patient_id, study.issuer_of_patient_id)
    if instance is not None and instance.series_id != series.id:
        raise IdentityConflict(
            f"identity conflict: instance {incoming.sop_instance_uid} is in another series",
            study_id=study.id,
        )
    if instance is not None and instance.sha256 == sha256:
        return Recorded(StoreOutcome.DUPLICATE, None, study.id, series.id, patient)
    if instance is not None:
        old_path = instance.path
        instance.path = rel
        instance.size_bytes = size
        instance.sha256 = sha256
        instance.sop_class_uid = incoming.sop_class_uid
        instance.transfer_syntax_uid = incoming.transfer_syntax_uid
        instance.calling_ae = association.calling_ae
        instance.source_address = association.source_address
        instance.association_id = association.id
        instance.received_at = received_at
        instance.replaced_count += 1
        series.changed = True
        add_event(
            session,
            "series",
            series.id,
            "instance_replaced",
            sop_instance_uid=incoming.sop_instance_uid,
            calling_ae=association.calling_ae,
        )
        return Recorded(StoreOutcome.REPLACED, old_path, study.id, series.id, patient)
    session.add(
        Instance(
            series_id=series.id,
            sop_instance_uid=incoming.sop_instance_uid,
            sop_class_uid=incoming.sop_class_uid,
            transfer_syntax_uid=incoming.transfer_syntax_uid,
            path=rel,
            size_bytes=size,
            sha256=sha256,
            calling_ae=association.calling_ae,
            source_address=association.source_address,
            association_id=association.id,
            received_at=received_at,
        )
    )
    return Recorded(StoreOutcome.STORED, None, study.id, series.id, patient)


def identical(session: Session, incoming: IncomingInstance, sha256: str) -> tuple[int, int] | None:
    """(study id, series id) when exactly these bytes are stored under the same UIDs; else None."""
    row = session.execute(
        select(Study.id, Series.id)
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(
            Instance.sop_instance_uid == incoming.sop_instance_uid,
            Instance.sha256 == sha256,
            Series.series_instance_uid == incoming.series_instance_uid,
            Study.study_instance_uid == incoming.study_instance_uid,
        )
    ).first()
    return (row[0], row[1]) if row is not None else None
