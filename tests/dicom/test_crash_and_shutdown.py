"""Faults while receiving: ``kill -9`` (then restart and resend) and SIGTERM (a clean stop).

Whatever was acknowledged is present, readable and recorded exactly once; nothing half-written
is visible. Run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from daemon.dicom.scu import SendResult, send_files
from tests.support.dicom_bytes import content_digest, read_quietly
from tests.support.process import wait_until
from tests.support.service import Service, ServiceFactory
from tests.support.stored import assert_spool_consistent, spool_objects, spool_temp_files, stored_instances


class Sender:
    """Sends files in a background thread, one association, recording each file's outcome."""

    def __init__(self, service: Service, files: list[Path]) -> None:
        self.results: list[SendResult] = []
        self._thread = threading.Thread(target=self._run, args=(service, files), daemon=True)
        self._thread.start()

    def _run(self, service: Service, files: list[Path]) -> None:
        # A short DIMSE timeout: pynetdicom notices a dead peer only when it expires.
        for result in send_files(service.peer, files, calling_ae="FAULT_SCU", timeout=10):
            self.results.append(result)

    def acked(self) -> int:
        return sum(r.ok for r in self.results)

    def join(self) -> list[SendResult]:
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "the sender did not finish"
        return self.results


def acknowledged(results: list[SendResult]) -> set[str]:
    return {r.sop_instance_uid for r in results if r.ok}


def assert_acknowledged_are_stored(svc: Service, acked: set[str]) -> None:
    rows = stored_instances(svc.database_url)
    missing = acked - set(rows)
    assert not missing, f"acknowledged but not recorded: {sorted(missing)}"
    files = spool_objects(svc.spool)
    for uid in acked:
        row = rows[uid]
        path = files[row.path]
        assert content_digest(path) == (row.sha256, row.size_bytes)
        assert read_quietly(path).SOPInstanceUID == uid


@pytest.mark.slow
def test_kill_9_while_receiving_then_restart_and_resend(
    services: ServiceFactory, series64: list[Path]
) -> None:
    svc = services()
    sender = Sender(svc, series64)
    wait_until(lambda: sender.acked() >= 16, timeout=120, what="16 acknowledged stores")
    svc.kill9()
    results = sender.join()
    assert len(results) == len(series64), "every file gets an outcome"
    acked = acknowledged(results)
    assert len(acked) < len(series64), "the kill came too late to interrupt the series"

    restarted = services(home=svc.home)  # same data directory and database
    assert spool_temp_files(restarted.spool) == [], "the dead process's temp files were not cleaned"
    assert_acknowledged_are_stored(restarted, acked)

    resend = [r.path for r in results if not r.ok]
    again = list(send_files(restarted.peer, resend, calling_ae="FAULT_SCU"))
    assert all(r.ok for r in again), [(r.path.name, r.status, r.comment) for r in again if not r.ok]
    rows = assert_spool_consistent(restarted.spool, restarted.database_url)  # once each, whole, no orphans
    assert set(rows) == {str(read_quietly(p, stop_before_pixels=True).SOPInstanceUID) for p in series64}
    assert restarted.status_json()["instances"] == 64


def test_sigterm_while_idle_exits_0(sqlite_services: ServiceFactory) -> None:
    svc = sqlite_services()
    assert svc.stop(timeout=60) == 0
    assert "pacs-triage stopped" in svc.log_text()


def test_sigterm_while_receiving_exits_0_and_records_what_it_acknowledged(
    services: ServiceFactory, series64: list[Path]
) -> None:
    svc = services()
    sender = Sender(svc, series64)
    wait_until(lambda: sender.acked() >= 8, timeout=120, what="8 acknowledged stores")
    assert svc.stop(timeout=120) == 0
    results = sender.join()
    acked = acknowledged(results)
    assert acked
    # In-flight stores finished or failed: nothing half-recorded, no orphan, no temp file.
    rows = assert_spool_consistent(svc.spool, svc.database_url)
    assert acked <= set(rows)
    assert "pacs-triage stopped" in svc.log_text()
