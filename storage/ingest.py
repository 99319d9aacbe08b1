"""Record received instances: spool file + study/series/instance rows, in one transaction.

The caller (the DICOM SCP) acknowledges only after :meth:`Ingest.store` returns. Any exception
means nothing new is visible: no row, and no spool file that a row points to.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction
from storage.errors import IdentityConflict, IntegrityProblem, StorageError
from storage.events import add_event  # the audit log's one API
from storage.file_records import Placement, lock_instance, remove_if_unnamed
from storage.group_commit import GroupCommit
from storage.identity import Patient, patient_conflict, record_conflict
from storage.models import Association, Instance, Series, Study, StudyState
from storage.spool import Spool

log = logging.getLogger(__name__)

_RACE_RETRIES = 3
_KNOWN_SERIES_LIMIT = 4096  # series whose ids this process remembers (a plain dict, cleared when full)
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
# The fast path's statements, built once (building and cache-keying them per instance cost more
# than executing them).
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(
        _STUDIES.c.id == bindparam("k_study_id"),
        _STUDIES.c.study_instance_uid == bindparam("k_study_uid"),
        _STUDIES.c.state == StudyState.RECEIVING.value,
    )
    .values(last_received_at=bindparam("k_received_at"))
)
_TOUCH_SERIES = (
    update(_SERIES)
    .where(
        _SERIES.c.id == bindparam("k_series_id"),
        _SERIES.c.series_instance_uid == bindparam("k_series_uid"),
        _SERIES.c.study_id == bindparam("k_study_id"),
    )
    .values(last_received_at=bindparam("k_received_at"), last_association_id=bindparam("k_association_id"))
)
_INSERT_INSTANCE = insert(_INSTANCES)


class StoreOutcome(enum.StrEnum):
    STORED = "stored"  # a new instance
    DUPLICATE = "duplicate"  # identical bytes were already stored: nothing new
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: replaced, series marked changed


@dataclass(frozen=True)
class AssociationInfo:
    """Who delivered an instance (all validated by the caller; none of it reaches a path)."""

    id: str
    calling_ae: str
    called_ae: str
    source_address: str
    started_at: dt.datetime


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
class _Recorded:
    outcome: StoreOutcome
    old_path: str | None  # the replaced file, to remove once the new row is committed
    study_id: int
    series_id: int
    patient: Patient | None = None  # the study's (Patient ID, issuer), if read


def _patient(incoming: IncomingInstance) -> Patient:
    return incoming.patient_id, incoming.issuer_of_patient_id


class _Stale(Exception):
    """The fast path's cached assumption no longer holds; nothing was written."""


class Ingest:
    """Stores instances durably and records them."""

    def __init__(self, sessions: sessionmaker[Session], spool: Spool) -> None:
        self.sessions = sessions
        self.spool = spool
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine), "the session factory must be bound to an engine"
        self._group = GroupCommit(engine, "recording an instance")
        # Rows this process has recorded, so that the next instance of a known series takes the
        # fast path (see _record_fast). Every fast-path statement re-checks what the cache assumes,
        # so a stale entry costs one fallback to the full path, never a wrong row.
        self._known_series: dict[tuple[str, str], tuple[int, int]] = {}  # (study, series UID) -> ids
        self._known_associations: set[str] = set()
        # (Patient ID, issuer) of the studies in _known_series, as stored: the fast path takes only
        # instances of the same patient (a study's patient never changes once recorded).
        self._patients: dict[int, tuple[str | None, str | None]] = {}

    def store(
        self,
        incoming: IncomingInstance,
        chunks: Sequence[bytes],
        association: AssociationInfo,
        received_at: dt.datetime | None = None,
    ) -> StoreOutcome:
        """Write the bytes durably, then record them; raises StorageUnavailable on disk/db failure.

        The file is placed before the transaction (the fsyncs stay outside the database's locks)
        and checked again under the instance lock (storage/file_records.py); superseded files
        are removed under that lock too, only when no row names them, before we return.
        """
        received_at = received_at or dt.datetime.now(dt.UTC)
        chunks = tuple(chunks)
        pending = self.spool.write_pending(chunks)
        uid = incoming.sop_instance_uid
        rel = self.spool.relative_path_for(uid, pending.sha256)
        if self.spool.has(rel):
            # Same UID and same content hash: the file of record (or an unrecorded orphan of a
            # crash) already holds exactly these bytes.
            self.spool.discard(pending)
        else:
            self.spool.commit(pending, uid)
        placement = Placement(self.spool, uid, rel, chunks)
        try:
            outcome, old_path = self._record(
                incoming, placement, pending.size_bytes, pending.sha256, association, received_at
            )
        except IdentityConflict as exc:
            self._remove_unnamed(rel, uid)
            self._record_conflict(exc, incoming, association)
            raise
        except BaseException:
            self._remove_unnamed(rel, uid)
            raise
        if old_path is not None and old_path != rel:
            self._remove_unnamed(old_path, uid)
        return outcome

    def _record_conflict(
        self, exc: IdentityConflict, incoming: IncomingInstance, association: AssociationInfo
    ) -> None:
        try:
            record_conflict(
                self.sessions,
                exc,
                sop_instance_uid=incoming.sop_instance_uid,
                calling_ae=association.calling_ae,
                association_id=association.id,
            )
        except StorageError as err:
            log.warning("could not record the identity conflict of %s: %s", incoming.sop_instance_uid, err)

    def _remove_unnamed(self, rel: str, uid: str) -> None:
        """Best effort: a file left now is an orphan that the next start removes."""
        try:
            remove_if_unnamed(self.sessions, self.spool, rel, uid)
        except Exception as exc:  # noqa: BLE001 - never hides the store's own outcome
            log.warning("could not remove %s now (removed at the next start): %s", rel, exc)

    def _record(
        self,
        incoming: IncomingInstance,
        placement: Placement,
        size: int,
        sha256: str,
        association: AssociationInfo,
        received_at: dt.datetime,
    ) -> tuple[StoreOutcome, str | None]:
        key = (incoming.study_instance_uid, incoming.series_instance_uid)
        known = self._known_series.get(key)
        patient = self._patients.get(known[0]) if known is not None else None
        if (
            known is not None
            and association.id in self._known_associations
            and patient is not None
            and patient_conflict(patient, _patient(incoming)) is None  # else the full path refuses it
        ):
            if self._record_fast(known, incoming, placement, size, sha256, association, received_at):
                return StoreOutcome.STORED, None
            self._known_series.pop(key, None)
        for attempt in range(_RACE_RETRIES):
            try:
                with transaction(self.sessions, "recording an instance") as session:
                    recorded = self._record_in(
                        session, incoming, placement, size, sha256, association, received_at
                    )
            except IntegrityError as exc:
                # Two associations created the same study/series/instance at once (PostgreSQL);
                # the retry finds the other's row.
                if attempt == _RACE_RETRIES - 1:
                    raise IntegrityProblem(
                        f"could not record {incoming.sop_instance_uid}: {exc.orig}"
                    ) from exc
                continue
            if len(self._known_series) >= _KNOWN_SERIES_LIMIT:
                self._known_series.clear()
            self._known_series[key] = (recorded.study_id, recorded.series_id)
            if recorded.patient is not None:
                if len(self._patients) >= _KNOWN_SERIES_LIMIT:
                    self._patients.clear()
                self._patients[recorded.study_id] = recorded.patient
            self._known_associations.add(association.id)
            return recorded.outcome, recorded.old_path
        raise AssertionError("unreachable")

    def _record_fast(
        self,
        known: tuple[int, int],
        incoming: IncomingInstance,
        placement: Placement,
        size: int,
        sha256: str,
        association: AssociationInfo,
        received_at: dt.datetime,
    ) -> bool:
        """Record a new instance of a series this process recorded before: three statements, no ORM.

        It writes exactly what ``_record_in`` writes for that case (study and series
        ``last_received_at``, the series' last association, the instance row) and checks, in the
        same transaction, every assumption the cache makes: the study and series rows still exist
        with these UIDs and this parent, the study is still receiving (else it must be reopened,
        with its event), the association row exists and the instance is new (foreign key and
        unique constraints). If any fails, nothing is written and it returns False: the caller
        takes the full path (reopen, duplicate, replacement). The statements are group-committed
        with those of other associations recording at the same moment (storage/group_commit.py).
        """
        study_id, series_id = known
        params = {
            "k_study_id": study_id,
            "k_study_uid": incoming.study_instance_uid,
            "k_series_id": series_id,
            "k_series_uid": incoming.series_instance_uid,
            "k_received_at": received_at,
            "k_association_id": association.id,
        }
        row = {
            "series_id": series_id,
            "sop_instance_uid": incoming.sop_instance_uid,
            "sop_class_uid": incoming.sop_class_uid,
            "transfer_syntax_uid": incoming.transfer_syntax_uid,
            "path": placement.relative_path,
            "size_bytes": size,
            "sha256": sha256,
            "calling_ae": association.calling_ae,
            "source_address": association.source_address,
            "association_id": association.id,
            "received_at": received_at,
            "replaced_count": 0,
        }

        def work(conn: Connection) -> None:
            # Never wait for the instance lock inside a shared transaction (it holds other
            # units' row locks): a busy instance takes the full path, which waits first.
            if not lock_instance(conn, placement.uid_hash, wait=False):
                raise _Stale
            placement.ensure()
            if conn.execute(_TOUCH_STUDY, params).rowcount != 1:
                raise _Stale
            if conn.execute(_TOUCH_SERIES, params).rowcount != 1:
                raise _Stale
            conn.execute(_INSERT_INSTANCE, row)

        try:
            self._group.run(work)  # committed with whatever other associations record meanwhile
        except (_Stale, IntegrityError):
            return False
        return True

    def _record_in(
        self,
        session: Session,
        incoming: IncomingInstance,
        placement: Placement,
        size: int,
        sha256: str,
        association: AssociationInfo,
        received_at: dt.datetime,
    ) -> _Recorded:
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
        same = _identical(session, incoming, sha256)
        if same is not None:
            # An identical resend (the PACS sending a study again, our own results coming back)
            # changes nothing: the study is not reopened and its completion clock not reset.
            return _Recorded(StoreOutcome.DUPLICATE, None, *same)
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
            conflict = patient_conflict((study.patient_id, study.issuer_of_patient_id), _patient(incoming))
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
            return _Recorded(StoreOutcome.DUPLICATE, None, study.id, series.id, patient)
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
            return _Recorded(StoreOutcome.REPLACED, old_path, study.id, series.id, patient)
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
        return _Recorded(StoreOutcome.STORED, None, study.id, series.id, patient)

    def end_association(self, association_id: str, *, released: bool) -> None:
        """Record that an association ended (released, or aborted/lost). No row: nothing was stored."""
        self._known_associations.discard(association_id)
        with transaction(self.sessions, "recording the end of an association") as session:
            row = session.get(Association, association_id)
            if row is not None:
                row.ended_at = dt.datetime.now(dt.UTC)
                row.released = released


def _identical(session: Session, incoming: IncomingInstance, sha256: str) -> tuple[int, int] | None:
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
