"""``pacs-triage serve`` after a power cut that took the last index commits (issue 15, SQLite).

The receiver flushes each instance's file (with its receipt) and commits its rows without a
flush. Here serve acknowledges a series, is killed with ``kill -9``, and its database is put back
to the copy taken before the series (the database file and its WAL as they were: the frames
written since never reached the disk). The next ``serve`` must record the acknowledged instances
again, from their files, before it accepts anything: same rows, same files, the calling AE and
address of the association that sent them, and a ``instances_recovered`` audit row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sqlalchemy.engine import make_url

from daemon.dicom.scu import send_files
from storage.recovery import RECOVERED_EVENT
from tests.support.service import ServiceFactory
from tests.support.stored import assert_spool_consistent, events, stored_instances

SUFFIXES = ("", "-wal")


def test_serve_records_again_what_a_power_cut_took(
    sqlite_services: ServiceFactory, series64: list[Path]
) -> None:
    svc = sqlite_services()
    assert svc.stop() == 0
    database = Path(str(make_url(svc.database_url).database))
    for suffix in SUFFIXES:  # the database as the disk holds it before the series
        if Path(f"{database}{suffix}").exists():
            shutil.copyfile(f"{database}{suffix}", f"{database}{suffix}.before")

    svc = sqlite_services(home=svc.home)
    results = list(send_files(svc.peer, series64[:12], calling_ae="CUT_SCU"))
    assert all(r.ok for r in results), [(r.status, r.comment) for r in results]
    acked = {r.sop_instance_uid for r in results}
    before_cut = assert_spool_consistent(svc.spool, svc.database_url)
    assert set(before_cut) == acked
    svc.kill9()

    # The power cut: what was written to the database since the copy never reached the disk.
    Path(f"{database}-shm").unlink(missing_ok=True)
    for suffix in SUFFIXES:
        Path(f"{database}{suffix}").unlink(missing_ok=True)
        if Path(f"{database}{suffix}.before").exists():
            shutil.copyfile(f"{database}{suffix}.before", f"{database}{suffix}")
    assert stored_instances(svc.database_url) == {}

    restarted = sqlite_services(home=svc.home)
    rows = assert_spool_consistent(restarted.spool, restarted.database_url)
    assert rows == before_cut  # the same rows: files, hashes, sizes, calling AE and address
    assert {(r.calling_ae, r.source_address) for r in rows.values()} == {("CUT_SCU", "127.0.0.1")}
    recovered = [
        json.loads(d)["count"] for _, _, kind, d in events(restarted.database_url) if kind == RECOVERED_EVENT
    ]
    assert recovered == [12]
    assert "recorded 12 instances again from their files" in restarted.log_text()
    assert restarted.status_json()["instances"] == 12
    # The peer resends what it is unsure of: duplicates, nothing new.
    again = list(send_files(restarted.peer, series64[:12], calling_ae="CUT_SCU"))
    assert all(r.ok for r in again)
    assert assert_spool_consistent(restarted.spool, restarted.database_url) == before_cut
