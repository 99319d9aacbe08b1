"""Partial reports (issue 11, item 11): a sender that pauses longer than the idle timeout while
its association stays open gets one report on the whole study, not one on half of it and then a
second one. A real ``pacs-triage serve`` (SQLite and PostgreSQL) and a real pynetdicom SCU."""

from __future__ import annotations

import uuid
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from storage.db import make_engine
from storage.models import Job, Study
from tests.support.process import wait_until
from tests.support.queue_db import ct_series
from tests.support.service import Service, ServiceFactory

CT = "1.2.840.10008.5.1.4.1.1.2"


def _associate(service: Service) -> Association:
    ae = AE(ae_title="PAUSING_CT")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", service.port, ae_title=service.ae_title)
    assert assoc.is_established
    return assoc


def _send(assoc: Association, files: list[Path]) -> None:
    for path in files:
        status = assoc.send_c_store(path)
        assert status.Status == 0x0000


def test_an_open_association_keeps_its_study_incomplete_past_the_idle_timeout(
    tmp_path: Path, services: ServiceFactory
) -> None:
    service = services(
        env={
            "PACS_TRIAGE_COMPLETION__IDLE_TIMEOUT_SECONDS": "2",
            "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "0.5",
            "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.25",
        }
    )
    engine = make_engine(service.database_url, pool_size=1)

    def state(uid: str) -> tuple[str | None, int]:
        with engine.connect() as conn:
            study = conn.execute(select(Study.id, Study.state).where(Study.study_instance_uid == uid)).first()
            if study is None:
                return None, 0
            jobs = conn.execute(select(Job.id).where(Job.study_id == study.id)).all()
        return study.state, len(jobs)

    paused, witness = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    files = ct_series(tmp_path / "paused", paused, paused + ".1", 6)
    holding = _associate(service)
    try:
        _send(holding, files[:3])  # half the study; then the sender pauses, association open
        # A witness study on an association that is aborted: only the idle timeout completes it.
        other = _associate(service)
        _send(other, ct_series(tmp_path / "witness", witness, witness + ".1", 2))
        other.abort()
        wait_until(
            lambda: state(witness) == ("complete", 1), timeout=60, what="the witness study complete by idle"
        )
        assert state(paused) == ("receiving", 0), "half a study was completed while its association was open"
        _send(holding, files[3:])
    finally:
        holding.release()
    wait_until(lambda: state(paused)[0] == "complete", timeout=60, what="the paused study complete")
    assert state(paused) == ("complete", 1), "one job, on the whole study"
    engine.dispose()
