"""SQLAlchemy 2 typed models: the schema of record. Migrations in ``storage/migrations`` must match it."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# A UID is at most 64 characters (PS3.5 9.1); AE titles 16 (PS3.5 6.2).
UID = String(64)
AE_TITLE = String(16)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the backend keeps.

    SQLite has no time zones and gives naive values back; naive inputs are refused so that a
    local time can never be stored by mistake.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC time")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StudyState(enum.StrEnum):
    """Where a study is in its life."""

    RECEIVING = "receiving"  # instances are arriving; not yet complete
    COMPLETE = "complete"  # released + quiet period passed (or idle timeout); routing decided
    NOT_ROUTED = "not_routed"  # complete, but no routing rule matched
    PURGED = "purged"  # retention removed its files after its results were delivered


class JobState(enum.StrEnum):
    """States of an analysis job (the queue is in ``storage/queue.py``)."""

    QUEUED = "queued"  # waiting for a worker (or for its retry time)
    RUNNING = "running"  # claimed by a worker under a lease
    SUCCEEDED = "succeeded"  # results and outbox rows written
    FAILED = "failed"  # permanent error: the same input would fail again
    DEAD = "dead"  # transient errors exhausted the attempts; retryable by hand
    CANCELLED = "cancelled"  # cancelled by an operator
    SUPERSEDED = "superseded"  # a newer input (late instances) replaced it


class DeliveryState(enum.StrEnum):
    """States of one result x destination row of the outbox (``storage/outbox.py``)."""

    PENDING = "pending"  # waiting to be sent (or for its retry time)
    SENDING = "sending"  # claimed by a dispatcher under a lease
    DELIVERED = "delivered"  # the destination accepted it (C-STORE success/warning, HL7 AA, HTTP 2xx)
    DEAD = "dead"  # attempts exhausted, or cannot ever be sent; retryable by hand
    CANCELLED = "cancelled"  # its result was superseded before it was sent


class Association(Base):
    """One DICOM association that delivered instances (for completion and audit)."""

    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # server-generated UUID
    calling_ae: Mapped[str] = mapped_column(AE_TITLE)
    called_ae: Mapped[str] = mapped_column(AE_TITLE)
    source_address: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    released: Mapped[bool] = mapped_column(Boolean, default=False)  # False + ended_at: aborted/lost


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64), default=None)  # with patient_id
    accession_number: Mapped[str | None] = mapped_column(String(16), default=None)
    state: Mapped[StudyState] = mapped_column(String(16), default=StudyState.RECEIVING)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    route_rule: Mapped[str | None] = mapped_column(String(64), default=None)  # the rule that matched
    route_detail: Mapped[str | None] = mapped_column(Text, default=None)  # why it matched, or why none did
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    # last_received_at as completion saw it: a later write means an instance raced the completion.
    completed_received_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16), default=None)
    body_part_examined: Mapped[str | None] = mapped_column(String(64), default=None)
    series_description: Mapped[str | None] = mapped_column(String(64), default=None)
    series_number: Mapped[int | None] = mapped_column(Integer, default=None)
    changed: Mapped[bool] = mapped_column(Boolean, default=False)  # an instance was replaced
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_association_id: Mapped[str | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), default=None
    )

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(255))  # relative to the spool root; server-derived only
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(AE_TITLE)
    source_address: Mapped[str] = mapped_column(String(64))
    association_id: Mapped[str | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), default=None, index=True
    )
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """An analysis job for one study input (its fingerprint)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=0)  # vocabulary.Priority, higher first
    state: Mapped[JobState] = mapped_column(String(16), default=JobState.QUEUED)
    input_fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    rule: Mapped[str | None] = mapped_column(String(64), default=None)  # routing rule that queued it
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (Index("ix_jobs_claim", "state", "priority", "run_after"),)


class Result(Base):
    """One DICOM object a job produced (SR, SEG), kept in the spool until retention."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    input_fingerprint: Mapped[str] = mapped_column(String(64))  # the input this result saw
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)  # derived from the fingerprint
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str | None] = mapped_column(String(255))  # in the spool; None once retention removed it
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=0)  # vocabulary.Priority found by the pipeline
    summary: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Delivery(Base):
    """Outbox row: one result to one destination, sent by the dispatcher with retries."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))  # destination name in the config
    # What is sent of the result: "sr", "seg", "hl7_oru", "hl7_priority", "fhir"... ("": the object as is)
    content: Mapped[str] = mapped_column(String(16), default="", server_default="")
    peer: Mapped[str] = mapped_column(String(128))  # AET@HOST:PORT, mllp://HOST:PORT or URL (for operators)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # vocabulary.Priority, higher first
    state: Mapped[DeliveryState] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=10)
    run_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    # the peer's last answer: DIMSE status, HL7 error code (ERR-3, 0 for AA) or HTTP status, by content
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (Index("ix_deliveries_claim", "state", "priority", "run_after"),)


class Event(Base):
    """Append-only audit log of every state change."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    entity: Mapped[str] = mapped_column(String(16))  # study | series | instance | job | delivery
    entity_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_events_entity", "entity", "entity_id"),)


class Heartbeat(Base):
    """The last sign of life of one component process or thread (receiver, worker, dispatcher, scheduler).

    Written by the component itself, read by ``/readyz`` and the dashboard, so that one node's
    health is read from the database whichever process serves the request.
    """

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(160), primary_key=True)  # <component>@<host>:<pid>[#n]
    # receiver | worker | dispatcher | scheduler (storage.heartbeats.Component)
    component: Mapped[str] = mapped_column(String(16), index=True)
    host: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    busy: Mapped[bool] = mapped_column(Boolean, default=False)  # working on a job or a send right now
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    beat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
