"""Duplicate deliveries after a crash (issue 11, item 12), with a real ``pacs-triage serve`` on
SQLite and PostgreSQL and a real (pynetdicom) PACS that files objects by SOP Instance UID.

* A send that takes longer than the lease keeps its row: the lease is heartbeated, so no other
  dispatcher sends the same object meanwhile.
* ``kill -9`` of serve in the middle of a send: after the restart the row is sent again once
  its short lease has run out; the PACS holds exactly one copy of each object, and the re-send is
  counted in ``pacs-triage status``.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from pathlib import Path

from sqlalchemy import select

from daemon.dicom.scu import send_files
from storage.db import make_engine
from storage.models import Delivery, DeliveryState
from tests.support.delivery import SlowPacs
from tests.support.dicom_bytes import echo_status
from tests.support.peers import free_port, need_dcmtk
from tests.support.process import clean_env, wait_until
from tests.support.queue_db import ct_series
from tests.support.service import Service, ServiceFactory

LEASE_SECONDS = 2.0


def _env(pacs: SlowPacs) -> dict[str, str]:
    return {
        "PACS_TRIAGE_DESTINATION": pacs.destination,
        "PACS_TRIAGE_WORKERS__COUNT": "1",
        "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.25",
        "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "0.5",
        "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.25",
        "PACS_TRIAGE_DISPATCH__POLL_SECONDS": "0.25",
        "PACS_TRIAGE_DISPATCH__LEASE_SECONDS": str(LEASE_SECONDS),
        "PACS_TRIAGE_DISPATCH__REAP_INTERVAL_SECONDS": "0.25",
    }


def _deliveries(service: Service) -> list[tuple[DeliveryState, int]]:
    engine = make_engine(service.database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Delivery.state, Delivery.attempts).order_by(Delivery.id)).all()
    finally:
        engine.dispose()
    return [(DeliveryState(state), attempts) for state, attempts in rows]


def _send_study(service: Service, tmp_path: Path) -> None:
    study = f"2.25.{uuid.uuid4().int}"
    files = ct_series(tmp_path / "study", study, study + ".1", 3)
    assert all(r.status == 0 for r in send_files(service.peer, files, calling_ae="CT_SCANNER"))


def _later(since: dt.datetime, seconds: float) -> bool:
    return dt.datetime.now(dt.UTC) >= since + dt.timedelta(seconds=seconds)


def test_a_send_longer_than_its_lease_is_not_sent_twice(tmp_path: Path, services: ServiceFactory) -> None:
    with SlowPacs(tmp_path / "pacs").running() as pacs:
        service = services(env=_env(pacs))
        _send_study(service, tmp_path)
        assert pacs.first_received.wait(120), "the result never reached the PACS"
        held_since = dt.datetime.now(dt.UTC)
        # The PACS sits on its answer for three leases while the reaper runs every 0.25 s.
        wait_until(lambda: _later(held_since, 3 * LEASE_SECONDS), timeout=60, what="three leases")
        assert _deliveries(service) == [(DeliveryState.SENDING, 1)], "the row left its sender"
        pacs.answer.set()
        wait_until(
            lambda: _deliveries(service) == [(DeliveryState.DELIVERED, 1)], timeout=60, what="delivered once"
        )
        assert len(pacs.receptions) == 1, pacs.receptions
        assert service.status_json()["queue"]["resent_deliveries_total"] == 0


def test_kill_9_mid_delivery_resends_once_and_the_pacs_holds_one_copy(
    tmp_path: Path, services: ServiceFactory
) -> None:
    with SlowPacs(tmp_path / "pacs").running() as pacs:
        first = services(env=_env(pacs), name="before-crash")
        _send_study(first, tmp_path)
        assert pacs.first_received.wait(120), "the result never reached the PACS"
        assert _deliveries(first) == [(DeliveryState.SENDING, 1)]
        first.kill9()  # mid-delivery: the PACS has the object, serve never heard its answer
        pacs.answer.set()
        again = services(env=_env(pacs), home=first.home, port=first.port, name="after-crash")
        wait_until(
            lambda: _deliveries(again) == [(DeliveryState.DELIVERED, 2)],
            timeout=120,
            what="the delivery sent again and recorded",
        )
        assert len(pacs.receptions) == 2 and len(set(pacs.receptions)) == 1, pacs.receptions
        assert pacs.copies() == {pacs.receptions[0]: 1}, "exactly one copy of the object at the PACS"
        status = again.status_json()
        assert status["queue"]["resent_deliveries_total"] == 1, status["queue"]
        assert "re-sent deliveries: 1" in again.cli("status").stdout


def test_kill_9_mid_delivery_to_storescp_leaves_one_copy(tmp_path: Path, services: ServiceFactory) -> None:
    """The same with dcmtk storescp as the PACS, answering each C-STORE only after a pause."""
    received = tmp_path / "storescp"
    received.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("wb")
    scp = subprocess.Popen(
        [
            need_dcmtk("storescp"),
            "-od",
            str(received),
            "-aet",
            "DEST",
            "--sleep-during",
            "4",
            "-v",
            str(port),
        ],
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: echo_status(port, called_ae="DEST", timeout=2) == 0, timeout=20, what="storescp")
        env = _env_for(f"DEST@127.0.0.1:{port}")
        first = services(env=env, name="before-crash")
        _send_study(first, tmp_path)
        wait_until(
            lambda: _deliveries(first) == [(DeliveryState.SENDING, 1)],
            timeout=120,
            what="a send in flight",
            interval=0.05,
        )
        first.kill9()
        again = services(env=env, home=first.home, port=first.port, name="after-crash")
        wait_until(
            lambda: _deliveries(again) == [(DeliveryState.DELIVERED, 2)],
            timeout=120,
            what="the delivery sent again and recorded",
        )
        reports = [p for p in received.iterdir() if p.is_file()]
        assert len(reports) == 1, reports  # storescp files by SOP Instance UID, as a PACS keeps one copy
        assert again.status_json()["queue"]["resent_deliveries_total"] == 1
    finally:
        scp.terminate()
        scp.wait(timeout=10)
        log.close()


def _env_for(destination: str) -> dict[str, str]:
    env = _env(SlowPacs(Path("/nonexistent")))
    env["PACS_TRIAGE_DESTINATION"] = destination
    return env
