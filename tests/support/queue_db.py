"""Fixtures for queue, completion and worker tests: a migrated database on both backends, studies,
jobs, a clock, and an in-process node."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config, load_config
from daemon.delivery.dispatcher import Dispatcher
from daemon.service.routing import CompletionSweep
from daemon.service.worker import Worker
from storage.completion import digest_of, input_fingerprint
from storage.db import make_engine, make_session_factory, transaction
from storage.migrate import upgrade
from storage.models import Association, Delivery, Instance, Series, Study, StudyState
from storage.outbox import Outbox
from storage.queue import enqueue
from storage.retry import Backoff
from storage.spool import Spool
from vocabulary import Priority

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


class Clock:
    """A clock the test moves by hand (leases and backoff without sleeping)."""

    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


@dataclass
class Db:
    url: str
    engine: Engine
    sessions: sessionmaker[Session]


@pytest.fixture
def db(database_url: str) -> Iterator[Db]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield Db(database_url, engine, make_session_factory(engine))
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def add_study(
    db: Db,
    uid: str | None = None,
    *,
    series: Sequence[tuple[str, int]] = (("CT", 3),),
    at: dt.datetime = T0,
    association: str | None = None,
    released: bool | None = True,
    ended_at: dt.datetime | None = None,
    calling_ae: str = "MODALITY",
    description: str = "",
) -> int:
    """Record a study directly (no files): ``series`` is (modality, instance count) per series.

    ``released``: True/False = the association ended (released or aborted) at ``ended_at`` (default
    ``at``); None = it is still open.
    """
    uid = uid or f"2.25.{uuid.uuid4().int}"
    with transaction(db.sessions, "test setup") as session:
        assoc_id = association or str(uuid.uuid4())
        if session.get(Association, assoc_id) is None:
            session.add(
                Association(
                    id=assoc_id,
                    calling_ae=calling_ae,
                    called_ae="PACS_TRIAGE",
                    source_address="127.0.0.1",
                    started_at=at,
                    ended_at=None if released is None else (ended_at or at),
                    released=bool(released),
                )
            )
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
        if study is None:
            study = Study(
                study_instance_uid=uid, state=StudyState.RECEIVING, first_received_at=at, last_received_at=at
            )
            session.add(study)
        else:
            study.last_received_at = at
            if study.state != StudyState.RECEIVING:
                study.state = StudyState.RECEIVING
                study.completed_at = None
        session.flush()
        for modality, count in series:
            s = Series(
                study_id=study.id,
                series_instance_uid=f"{uid}.{uuid.uuid4().int % 10**12}",
                modality=modality,
                series_description=description,
                last_received_at=at,
                last_association_id=assoc_id,
            )
            session.add(s)
            session.flush()
            for _ in range(count):
                sop = f"2.25.{uuid.uuid4().int}"
                session.add(
                    Instance(
                        series_id=s.id,
                        sop_instance_uid=sop,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=f"objects/none/{sop}.dcm",
                        size_bytes=1,
                        sha256=uuid.uuid4().hex * 2,
                        calling_ae=calling_ae,
                        source_address="127.0.0.1",
                        association_id=assoc_id,
                        received_at=at,
                    )
                )
        return study.id


def study_fingerprint(db: Db, study_id: int, pipeline: str = "noop") -> str:
    with db.sessions() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.sha256).join(Series).where(Series.study_id == study_id)
        )
        return input_fingerprint(pipeline, digest_of(rows))


def add_job(
    db: Db,
    study_id: int | None = None,
    *,
    priority: Priority = Priority.ROUTINE,
    at: dt.datetime = T0,
    max_attempts: int = 3,
    pipeline: str = "noop",
    rule: str | None = "default",
) -> int:
    """Queue a job for a (new) study's current content."""
    study_id = study_id or add_study(db, at=at)
    with transaction(db.sessions, "test setup") as session:
        job = enqueue(
            session,
            study_id=study_id,
            pipeline=pipeline,
            priority=priority,
            input_fingerprint=study_fingerprint(db, study_id, pipeline),
            max_attempts=max_attempts,
            now=at,
            rule=rule,
        )
        assert job is not None
        return job.id


def ct_series(
    directory: Path,
    study_uid: str,
    series_uid: str,
    count: int,
    *,
    description: str = "Thorax",
    number: int = 1,
) -> list[Path]:
    """``count`` tiny CT images (8x8, Explicit VR Little Endian) of one series, written to ``directory``."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = f"{series_uid}.{i + 1}"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Queue^Test", "QT-1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260102", "030405", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = (
            "CT",
            number,
            description,
            i + 1,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = "1.0"
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((8, 8), i, dtype=np.uint16).tobytes()
        path = directory / f"{series_uid}.{i + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ingest_files(db: Db, spool: Spool, files: Sequence[Path], *, released: bool = True) -> str:
    """Store ``files`` as one association would (real spool files and rows); returns the association id."""
    from pydicom import dcmread

    from storage.ingest import AssociationInfo, IncomingInstance, Ingest

    ingest = Ingest(db.sessions, spool)
    info = AssociationInfo(
        id=str(uuid.uuid4()),
        calling_ae="MODALITY",
        called_ae="PACS_TRIAGE",
        source_address="127.0.0.1",
        started_at=dt.datetime.now(dt.UTC),
    )
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        ingest.store(
            IncomingInstance(
                study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                modality=ds.Modality,
                series_description=ds.SeriesDescription,
                series_number=int(ds.SeriesNumber),
            ),
            (path.read_bytes(),),
            info,
        )
    ingest.end_association(info.id, released=released)
    return info.id


@dataclass
class Node:
    """Storage, a worker and a dispatcher in this process, sending to ``destination``."""

    config: Config
    db: Db
    spool: Spool
    results: Spool
    outbox: Outbox
    dispatcher: Dispatcher
    worker: Worker
    tmp: Path

    def produce_result(self) -> str:
        """Receive a small study, complete it and run the echo pipeline; returns the result's SOP UID."""
        study = f"2.25.{uuid.uuid4().int}"
        ingest_files(self.db, self.spool, ct_series(self.tmp / "in", study, study + ".1", 2))
        CompletionSweep(self.config, self.db.sessions, self.spool).force(study)
        assert self.worker.run_one()
        with self.db.sessions() as session:
            row = session.scalars(select(Delivery).order_by(Delivery.id.desc())).first()
            assert row is not None
        return self.outbox.recent(limit=1)[0].sop_instance_uid

    def delivery(self) -> Delivery:
        with self.db.sessions() as session:
            return session.scalars(select(Delivery).order_by(Delivery.id.desc())).one()


def make_node(db: Db, tmp_path: Path, destination: str, *, attempts: int = 10, timeout: float = 5.0) -> Node:
    home = tmp_path / "home"
    toml = tmp_path / "node.toml"
    ae, rest = destination.split("@")
    host, port = rest.split(":")
    toml.write_text(
        f'[[destinations]]\nname = "pacs"\nae_title = "{ae}"\nhost = "{host}"\nport = {port}\n'
        f"timeout_seconds = {timeout}\n"
    )
    config = load_config(
        toml,
        {
            "PACS_TRIAGE_HOME": str(home),
            "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
            "PACS_TRIAGE_DISPATCH__MAX_ATTEMPTS": str(attempts),
        },
    )
    spool = Spool(config.spool_dir)
    spool.open()
    results = Spool(config.results_dir)
    results.open()
    outbox = Outbox(db.sessions, lease_seconds=60, backoff=Backoff(base_seconds=0, max_seconds=0, jitter=0))
    return Node(
        config,
        db,
        spool,
        results,
        outbox,
        Dispatcher(config, outbox, results, name="test-dispatch"),
        Worker(config, db.sessions, spool, results, name="test-worker"),
        tmp_path,
    )
