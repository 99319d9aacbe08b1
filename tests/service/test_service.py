"""The whole service in its own processes: completion over several associations, a late series,
``kill -9`` of a worker mid-job, and a PostgreSQL restart while studies arrive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.engine import Engine

from daemon.dicom.scu import send_files
from pipeline.uids import derive_uid
from storage.db import make_engine, make_session_factory
from storage.models import Delivery, DeliveryState, Job, JobState
from tests.support.peers import need_peer
from tests.support.process import wait_until
from tests.support.queue_db import ct_series
from tests.support.service import Service, ServiceFactory
from tests.support.stored import events, stored_instances
from tests.support.storescp import Storescp

FAST = {
    "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.2",
    "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.2",
    "PACS_TRIAGE_WORKERS__LEASE_SECONDS": "2",
    "PACS_TRIAGE_WORKERS__REAP_INTERVAL_SECONDS": "0.5",
    "PACS_TRIAGE_WORKERS__BACKOFF__BASE_SECONDS": "0.2",
    "PACS_TRIAGE_DISPATCH__POLL_SECONDS": "0.2",
    "PACS_TRIAGE_DISPATCH__BACKOFF__BASE_SECONDS": "0.2",
    "PACS_TRIAGE_WORKERS__COUNT": "1",
}


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceFactory]:
    factory = ServiceFactory(tmp_path)
    yield factory
    factory.cleanup()


def start(
    services: ServiceFactory, storescp: Storescp, database_url: str | None = None, **env: str
) -> Service:
    return services(
        database_url=database_url, env={**FAST, "PACS_TRIAGE_DESTINATION": storescp.destination, **env}
    )


def pause(seconds: float) -> None:
    """The scenario itself: a modality that sends its series seconds apart (not a wait for a condition)."""
    time.sleep(seconds)


def send(service: Service, files: list[Path]) -> None:
    results = list(send_files(service.peer, files, calling_ae="MODALITY", timeout=30))
    assert all(r.ok for r in results), [(r.status, r.comment) for r in results]


def jobs(service: Service) -> list[tuple[JobState, int]]:
    engine = make_engine(service.database_url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            return [(JobState(j.state), j.attempts) for j in session.scalars(select(Job).order_by(Job.id))]
    finally:
        engine.dispose()


def delivered(service: Service) -> int:
    engine = make_engine(service.database_url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            return len(
                session.scalars(select(Delivery.id).where(Delivery.state == DeliveryState.DELIVERED)).all()
            )
    finally:
        engine.dispose()


def referenced_series(report: Dataset) -> set[str]:
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    return {str(s.SeriesInstanceUID) for s in evidence.ReferencedSeriesSequence}


def test_series_on_three_associations_make_one_job_and_a_late_series_supersedes_it(
    services: ServiceFactory, storescp: Storescp, tmp_path: Path
) -> None:
    storescp.start()
    svc = start(services, storescp, PACS_TRIAGE_COMPLETION__QUIET_SECONDS="3")
    study = f"2.25.{uuid.uuid4().int}"
    series = [f"{study}.{n}" for n in range(1, 5)]
    for uid in series[:3]:
        send(svc, ct_series(tmp_path / "in", study, uid, 2))
        pause(1.0)
    wait_until(lambda: delivered(svc) == 1, timeout=60, what="the first result to be delivered")
    assert jobs(svc) == [(JobState.SUCCEEDED, 1)], "three associations seconds apart: one job"
    first = dcmread(storescp.files()[0])
    assert referenced_series(first) == set(series[:3])
    send(svc, ct_series(tmp_path / "in", study, series[3], 1))  # a late series
    wait_until(lambda: delivered(svc) == 2, timeout=60, what="the superseding result to be delivered")
    assert jobs(svc) == [(JobState.SUPERSEDED, 1), (JobState.SUCCEEDED, 1)]
    reports = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, storescp.files())}
    assert len(reports) == 2
    latest = next(ds for ds in reports.values() if ds.SOPInstanceUID != first.SOPInstanceUID)
    assert referenced_series(latest) == set(series), "the final result reflects all series"
    assert latest.StudyInstanceUID == study


def test_worker_killed_mid_job_is_rerun_and_the_destination_gets_one_result(
    services: ServiceFactory, storescp: Storescp, tmp_path: Path
) -> None:
    storescp.start()
    svc = start(
        services,
        storescp,
        PACS_TRIAGE_COMPLETION__QUIET_SECONDS="0.5",
        PACS_TRIAGE_PIPELINES__ECHO_DELAY_SECONDS="3",
    )
    study = f"2.25.{uuid.uuid4().int}"
    send(svc, ct_series(tmp_path / "in", study, study + ".1", 3))

    def running_owner() -> str | None:
        for entity, _, kind, detail in events(svc.database_url):
            if (entity, kind) == ("job", "running"):
                return str(json.loads(detail)["owner"])
        return None

    owner = wait_until(running_owner, timeout=60, what="a worker to claim the job")
    pid = int(re.fullmatch(r"worker@[^:]+:(\d+)/\w+", owner).group(1))  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: delivered(svc) == 1, timeout=90, what="the re-run's result to be delivered")
    assert jobs(svc) == [(JobState.SUCCEEDED, 2)], "re-run once after the lease expired"
    kinds = [k for e, _, k, _ in events(svc.database_url) if e == "job"]
    assert kinds == ["queued", "running", "queued", "running", "succeeded"]
    files = storescp.files()
    assert len(files) == 1, "exactly one result at the destination"
    engine = make_engine(svc.database_url, pool_size=1)
    with make_session_factory(engine)() as session:
        fingerprint = session.scalars(select(Job.input_fingerprint)).one()
    engine.dispose()
    assert dcmread(files[0]).SOPInstanceUID == derive_uid(fingerprint, "echo", "1", "sr", "instance")
    assert "restarting it" in svc.log_text(), "serve replaced the killed worker"


def pg_restart() -> None:
    ctl = shutil.which("pg_ctlcluster")
    need_peer(ctl is not None, "pg_ctlcluster (Debian postgresql-common) to restart PostgreSQL")
    subprocess.run(
        [str(ctl), "--skip-systemctl-redirect", "15", "main", "restart"],
        check=True,
        timeout=120,
        capture_output=True,
    )


@pytest.mark.slow
def test_postgresql_restart_while_serving(
    services: ServiceFactory, storescp: Storescp, tmp_path: Path, pg_url: str, pg_admin: Engine
) -> None:
    storescp.start()
    svc = start(services, storescp, database_url=pg_url, PACS_TRIAGE_COMPLETION__QUIET_SECONDS="1")
    study = f"2.25.{uuid.uuid4().int}"
    files = ct_series(tmp_path / "in", study, study + ".1", 400)
    statuses: dict[str, int | None] = {}
    done = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", svc.port, ae_title=svc.ae_title)
        assert assoc.is_established
        try:
            for path in files:
                if done.is_set():
                    break
                rsp = assoc.send_c_store(path)
                statuses[path.stem] = int(rsp.Status) if "Status" in rsp else None
        finally:
            assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    wait_until(lambda: len(statuses) >= 30, timeout=60, what="stores before the restart")
    pg_restart()
    pg_admin.dispose()  # the fixture's pooled connection died with the server
    before = len(statuses)
    wait_until(
        lambda: sum(s == 0 for s in list(statuses.values())[before:]) >= 30 or not thread.is_alive(),
        timeout=120,
        what="stores to succeed again after the restart",
    )
    done.set()
    thread.join(timeout=60)
    acknowledged = {uid for uid, s in statuses.items() if s == 0}
    refused = {uid for uid, s in statuses.items() if s != 0}
    assert {statuses[uid] for uid in refused} <= {0xA700}, "stores during the outage are refused with A700"
    assert refused, "some stores hit the outage"
    stored = set(stored_instances(svc.database_url))
    assert acknowledged <= stored, f"acknowledged but lost: {sorted(acknowledged - stored)[:5]}"
    # The service recovered by itself: the study completes, runs and is delivered.
    wait_until(lambda: delivered(svc) >= 1, timeout=120, what="the result after the restart")
    assert len(storescp.files()) == 1
    report = dcmread(storescp.files()[0])
    seen = {
        str(r.ReferencedSOPInstanceUID)
        for s in report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert seen == stored, "the result covers every stored instance"
