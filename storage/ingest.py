"""Record received instances: spool file + study/series/instance rows, in one transaction.

The caller (the DICOM SCP) acknowledges only after :meth:`Ingest.store` returns. Any exception
means nothing new is visible: no row, and no spool file that a row points to.

One flush per instance (issue 15): the file, with its receipt (storage/receipt.py), is flushed
before the rows are committed; on SQLite the commit does not flush (storage/db.py
``COMMIT_FLUSH``) and ``storage.recovery`` rebuilds at the next start any rows a power cut took.
On PostgreSQL the commit flushes by default: the database may be on another host, which can
lose power alone while this receiver (the one that would rebuild the rows) keeps running.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import COMMIT_FLUSH, make_session_factory, transaction
from storage.errors import IdentityConflict, IntegrityProblem, StorageError
from storage.file_records import Placement, lock_instance, remove_if_unnamed
from storage.group_commit import GroupCommit
from storage.identity import patient_conflict, record_conflict
from storage.models import Association, Instance, Series, Study, StudyState
from storage.receipt import Delivery, sealable
from storage.recording import (
    AssociationInfo,
    IncomingInstance,
    StoreOutcome,
    patient_of,
    record_in,
)
from storage.spool import Spool

__all__ = ["AssociationInfo", "IncomingInstance", "Ingest", "StoreOutcome"]  # the receiver's API

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


class _Stale(Exception):
    """The fast path's cached assumption no longer holds; nothing was written."""


class Ingest:
    """Stores instances durably and records them."""

    def __init__(
        self, sessions: sessionmaker[Session], spool: Spool, *, flush_commit: bool | None = None
    ) -> None:
        """``flush_commit``: whether the rows' commit flushes (None: not on SQLite, on PostgreSQL)."""
        self.sessions = sessions
        self.spool = spool
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine), "the session factory must be bound to an engine"
        if flush_commit is None:
            flush_commit = engine.dialect.name != "sqlite"
        self.flush_commit = flush_commit
        # Where the rows of a store are committed: with a flush (key True), or without one when
        # the file carries its receipt (key False). Each has its own group commit.
        relaxed = engine if flush_commit else engine.execution_options(**{COMMIT_FLUSH: False})
        self._commits = {
            True: (sessions, GroupCommit(engine, "recording an instance")),
            False: (make_session_factory(relaxed), GroupCommit(relaxed, "recording an instance")),
        }
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

        The file is placed before the transaction (its flush stays outside the database's locks)
        and checked again under the instance lock (storage/file_records.py); superseded files
        are removed under that lock too, only when no row names them, before we return.
        """
        received_at = received_at or dt.datetime.now(dt.UTC)
        chunks = tuple(chunks)
        uid = incoming.sop_instance_uid
        # One flush (storage/spool.py): identical bytes already in place (the file of record, or
        # an unrecorded orphan of a crash) are not written again.
        delivery = Delivery(association, received_at)
        stored, written = self.spool.store(chunks, uid, delivery)
        # The rows must not be lost when no receipt of this delivery can rebuild them: bytes that
        # cannot carry one, or bytes already in place (another delivery's receipt: a failed
        # store's leftover, a purged study's file not removed yet, a superseded version's).
        flush = self.flush_commit or not written or not sealable(chunks)
        rel = stored.relative_path
        placement = Placement(self.spool, uid, rel, chunks, delivery)
        try:
            outcome, old_path = self._record(
                incoming, placement, stored.size_bytes, stored.sha256, association, received_at, flush
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
        flush: bool,
    ) -> tuple[StoreOutcome, str | None]:
        sessions, group = self._commits[flush]
        key = (incoming.study_instance_uid, incoming.series_instance_uid)
        known = self._known_series.get(key)
        patient = self._patients.get(known[0]) if known is not None else None
        if (
            known is not None
            and association.id in self._known_associations
            and patient is not None
            and patient_conflict(patient, patient_of(incoming)) is None  # else the full path refuses it
        ):
            if self._record_fast(group, known, incoming, placement, size, sha256, association, received_at):
                return StoreOutcome.STORED, None
            self._known_series.pop(key, None)
        for attempt in range(_RACE_RETRIES):
            try:
                with transaction(sessions, "recording an instance") as session:
                    recorded = record_in(session, incoming, placement, size, sha256, association, received_at)
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
        group: GroupCommit,
        known: tuple[int, int],
        incoming: IncomingInstance,
        placement: Placement,
        size: int,
        sha256: str,
        association: AssociationInfo,
        received_at: dt.datetime,
    ) -> bool:
        """Record a new instance of a series this process recorded before: three statements, no ORM.

        It writes exactly what ``storage.recording.record_in`` writes for that case (study and series
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
            group.run(work)  # committed with whatever other associations record meanwhile
        except (_Stale, IntegrityError):
            return False
        return True

    def end_association(self, association_id: str, *, released: bool) -> None:
        """Record that an association ended (released, or aborted/lost). No row: nothing was stored."""
        self._known_associations.discard(association_id)
        with transaction(self.sessions, "recording the end of an association") as session:
            row = session.get(Association, association_id)
            if row is not None:
                row.ended_at = dt.datetime.now(dt.UTC)
                row.released = released
