"""A power cut after the acknowledgement: the index rows are rebuilt from the files (issue 15).

The receiver acknowledges once an instance's file (with its receipt) is flushed; its rows are
committed without a flush. A power cut can then lose the last commits, never the files. Here the
commits are lost for real: the database is put back to a copy taken before them (SQLite: the
database file after a checkpoint, the WAL tail gone; PostgreSQL: a template copy of the
database), the spool left as the real write path left it, with a rename lost as well. The next
start must record exactly the acknowledged instances, with the association that delivered them
and their receipt times, replace the older version, reopen the completed study, refuse the
identity conflict again, and remove the torn slot. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import Engine, make_url

from daemon.dicom.stored import describe_stored
from storage.db import make_engine, make_session_factory
from storage.errors import IdentityConflict
from storage.identity import IDENTITY_CONFLICT_EVENT
from storage.ingest import AssociationInfo, Ingest, StoreOutcome
from storage.migrate import upgrade
from storage.models import Association, Instance, Series, Study, StudyState
from storage.receipt import Delivery, Receipt, digest, seal
from storage.recording import IncomingInstance
from storage.recovery import RECOVERED_EVENT, Recovery, recover_index
from storage.spool import Spool
from tests.support.dicom_bytes import content_digest
from tests.support.instances import ct_chunks, ct_dataset, ct_incoming
from tests.support.peers import need_tool
from tests.support.stored import assert_spool_consistent, events, stored_instances

T0 = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)
BEFORE = AssociationInfo("1" * 36, "OLD_SCU", "PACS_TRIAGE", "127.0.0.1", T0)
AFTER = AssociationInfo("2" * 36, "CT_SCANNER", "PACS_TRIAGE", "10.1.2.3", T0 + dt.timedelta(hours=1))
S1, SE1, S2, SE2 = "1.2.9.1", "1.2.9.1.1", "1.2.9.2", "1.2.9.2.1"


def at(minutes: int) -> dt.datetime:
    return AFTER.started_at + dt.timedelta(minutes=minutes)


class Database:
    """One test database that can be copied now and put back to that copy later."""

    def __init__(self, url: str, pg_admin: Engine | None) -> None:
        self.url = url
        self.pg_admin = pg_admin

    def snapshot(self) -> None:
        if self.pg_admin is None:
            path = Path(str(make_url(self.url).database))
            with sqlite3.connect(path) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copyfile(path, path.with_suffix(".snapshot"))
            return
        name = make_url(self.url).database
        with self.pg_admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}_snap" TEMPLATE "{name}"'))

    def lose_commits_since_snapshot(self) -> None:
        """What a power cut does to commits that were not flushed: they never happened."""
        if self.pg_admin is None:
            path = Path(str(make_url(self.url).database))
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(path.with_suffix(".snapshot"), path)
            return
        name = make_url(self.url).database
        with self.pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            conn.execute(text(f'ALTER DATABASE "{name}_snap" RENAME TO "{name}"'))


@pytest.fixture
def database(database_url: str, request: pytest.FixtureRequest) -> Database:
    is_pg = database_url.startswith("postgresql")
    return Database(database_url, request.getfixturevalue("pg_admin") if is_pg else None)


def open_ingest(url: str, spool_root: Path) -> tuple[Engine, Ingest]:
    engine = make_engine(url)
    spool = Spool(spool_root)
    spool.open()
    return engine, Ingest(make_session_factory(engine), spool, flush_commit=False)


def test_power_cut_after_the_ack_rebuilds_exactly_the_acknowledged(
    database: Database, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    engine = make_engine(database.url)
    upgrade(engine)
    engine.dispose()

    # Durable before the cut: a1 of study S1, which then completed.
    engine, ingest = open_ingest(database.url, root)
    a1 = ct_dataset("1.2.9.1.1.1", SE1, S1, patient="P1", fill=1)
    assert ingest.store(ct_incoming(a1), ct_chunks(a1), BEFORE, received_at=T0) is StoreOutcome.STORED
    # e1 replaced by a newer version, both durable; the superseded file's removal was lost.
    e1v0 = ct_dataset("1.2.9.1.1.7", SE1, S1, patient="P1", fill=10)
    e1v1 = ct_dataset("1.2.9.1.1.7", SE1, S1, patient="P1", fill=11)
    assert ingest.store(ct_incoming(e1v0), ct_chunks(e1v0), BEFORE, received_at=T0) is StoreOutcome.STORED
    e1v0_file = root / stored_instances(database.url)[e1v0.SOPInstanceUID].path
    e1v0_bytes = e1v0_file.read_bytes()
    later = T0 + dt.timedelta(minutes=1)
    assert (
        ingest.store(ct_incoming(e1v1), ct_chunks(e1v1), BEFORE, received_at=later) is StoreOutcome.REPLACED
    )
    e1v0_file.write_bytes(e1v0_bytes)
    with ingest.sessions.begin() as session:
        session.execute(update(Study).values(state=StudyState.COMPLETE, completed_at=later))
    old_a1_path = stored_instances(database.url)[a1.SOPInstanceUID].path
    engine.dispose()
    database.snapshot()

    # Acknowledged after the snapshot, committed without a flush: lost by the cut below.
    engine, ingest = open_ingest(database.url, root)
    a1v2 = ct_dataset(a1.SOPInstanceUID, SE1, S1, patient="P1", fill=2)
    a2 = ct_dataset("1.2.9.1.1.2", SE1, S1, patient="P1", fill=3)
    b1 = ct_dataset("1.2.9.2.1.1", SE2, S2, patient="P2", fill=4)
    b2 = ct_dataset("1.2.9.2.1.2", SE2, S2, patient="P2", fill=5)
    acked = {a1v2.SOPInstanceUID: (a1v2, at(1)), a2.SOPInstanceUID: (a2, at(2))}
    acked |= {b1.SOPInstanceUID: (b1, at(3)), b2.SOPInstanceUID: (b2, at(4))}
    outcomes = [
        ingest.store(ct_incoming(ds), ct_chunks(ds), AFTER, received_at=t) for ds, t in acked.values()
    ]
    assert outcomes == [StoreOutcome.REPLACED, StoreOutcome.STORED, StoreOutcome.STORED, StoreOutcome.STORED]
    assert ingest.store(ct_incoming(b1), ct_chunks(b1), AFTER, received_at=at(5)) is StoreOutcome.DUPLICATE
    # Another patient in S1: refused (C001); as if the removal of its file was lost too.
    c1 = ct_dataset("1.2.9.1.1.3", SE1, S1, patient="P9", fill=6)
    with pytest.raises(IdentityConflict):
        ingest.store(ct_incoming(c1), ct_chunks(c1), AFTER, received_at=at(6))
    ingest.spool.store(ct_chunks(c1), c1.SOPInstanceUID, Delivery(AFTER, at(6)))
    before_cut = stored_instances(database.url)
    assert set(before_cut) == {*acked, e1v1.SOPInstanceUID}
    engine.dispose()

    # The cut: unflushed commits gone; b2's rename into objects/ lost (its slot, of this pid but
    # an earlier boot, is what the disk kept); a slot being written is torn.
    database.lose_commits_since_snapshot()
    host = os.uname().nodename
    b2_file = root / before_cut[b2.SOPInstanceUID].path
    os.replace(b2_file, root / "slots" / f"{host}.{os.getpid()}.0123456789abcdef-{'0' * 32}.slot")
    d1 = ct_dataset("1.2.9.2.1.9", SE2, S2, patient="P2", fill=7)
    sha, size = digest(ct_chunks(d1))
    sealed = b"".join(seal(ct_chunks(d1), Receipt(Delivery(AFTER, at(7)), sha, size)))
    (root / "slots" / f"{host}.{os.getpid()}.0123456789abcdef-{'1' * 32}.slot").write_bytes(sealed[:-10])
    assert set(stored_instances(database.url)) == {a1.SOPInstanceUID, e1v1.SOPInstanceUID}  # rows lost
    assert stored_instances(database.url)[a1.SOPInstanceUID].path == old_a1_path

    # The next start.
    engine = make_engine(database.url)
    spool = Spool(root)
    spool.open()
    recovery = recover_index(make_session_factory(engine), spool, describe_stored)
    engine.dispose()

    assert recovery == Recovery(recorded=4, refused=1, removed=2)  # removed: c1's file, e1v0's
    rows = assert_spool_consistent(root, database.url)  # every row at its file, every file a row
    assert set(rows) == {*acked, e1v1.SOPInstanceUID}
    assert rows[e1v1.SOPInstanceUID].sha256 == digest(ct_chunks(e1v1))[0] and not e1v0_file.exists()
    for uid, (ds, _) in acked.items():
        row = rows[uid]
        assert (row.sha256, row.size_bytes) == digest(ct_chunks(ds)) == content_digest(root / row.path)
        assert (row.calling_ae, row.source_address) == ("CT_SCANNER", "10.1.2.3")
        assert row.path == before_cut[uid].path  # the same file of record as before the cut
    assert rows[a1.SOPInstanceUID].replaced_count == 1 and rows[a1.SOPInstanceUID].series_changed
    assert not (root / old_a1_path).exists()
    assert [p for p in (root / "slots").iterdir() if f".{os.getpid()}.0123456789abcdef-" in p.name] == []

    engine = make_engine(database.url)
    with make_session_factory(engine)() as session:
        instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        assert {uid: (i.association_id, i.received_at) for uid, i in instances.items() if uid in acked} == {
            uid: (AFTER.id, received_at) for uid, (_, received_at) in acked.items()
        }
        association = session.get(Association, AFTER.id)
        assert association is not None
        assert (association.calling_ae, association.called_ae, association.source_address) == (
            "CT_SCANNER",
            "PACS_TRIAGE",
            "10.1.2.3",
        )
        assert association.started_at == AFTER.started_at
        studies = {s.study_instance_uid: s for s in session.scalars(select(Study))}
        assert studies[S1].state == StudyState.RECEIVING and studies[S1].completed_at is None  # reopened
        assert studies[S1].last_received_at == at(2) and studies[S2].patient_id == "P2"
    engine.dispose()

    audit = events(database.url)
    assert [k for _, _, k, _ in audit if k == "reopened"] == ["reopened"]
    recovered = {json.loads(d)["count"] for _, _, k, d in audit if k == RECOVERED_EVENT}
    assert sorted(json.loads(d)["count"] for _, _, k, d in audit if k == RECOVERED_EVENT) == [2, 2], recovered
    conflicts = [json.loads(d) for _, _, k, d in audit if k == IDENTITY_CONFLICT_EVENT]
    assert [(c["sop_instance_uid"], c["recovered"]) for c in conflicts] == [(c1.SOPInstanceUID, "true")]

    # A second start finds nothing to do.
    engine = make_engine(database.url)
    assert recover_index(make_session_factory(engine), Spool(root), describe_stored) == Recovery(0, 0, 0)
    engine.dispose()


def test_a_purged_study_is_not_brought_back(database: Database, tmp_path: Path) -> None:
    """Retention removes the rows first, then the files: files left by a crash between stay gone."""
    engine = make_engine(database.url)
    upgrade(engine)
    engine.dispose()
    engine, ingest = open_ingest(database.url, tmp_path / "spool")
    for n in (1, 2):
        ds = ct_dataset(f"1.2.8.1.1.{n}", "1.2.8.1.1", "1.2.8.1", fill=n)
        ingest.store(ct_incoming(ds), ct_chunks(ds), AFTER, received_at=at(n))
    with ingest.sessions.begin() as session:  # storage/retention.py purge()'s transaction
        session.execute(delete(Instance))
        session.execute(delete(Series))
        session.execute(update(Study).values(state=StudyState.PURGED, purged_at=at(3)))
    engine.dispose()
    assert len(list((tmp_path / "spool" / "objects").glob("*/*/*.dcm"))) == 2

    engine = make_engine(database.url)
    recovery = recover_index(make_session_factory(engine), Spool(tmp_path / "spool"), describe_stored)
    engine.dispose()

    assert recovery == Recovery(recorded=0, refused=0, removed=2)
    assert stored_instances(database.url) == {}
    assert list((tmp_path / "spool" / "objects").glob("*/*/*.dcm")) == []


def test_the_ack_path_flushes_once_per_instance(tmp_path: Path) -> None:
    """strace counts fsync + fdatasync of a real store loop on SQLite: one per instance, not two.

    The same loop with the commit's flush (``flush_commit=True``) counts two, so the count is
    the write path's, not strace's. Per instance = (calls with 1 + 96 stores - calls with 1) / 96.
    """
    strace = need_tool("strace")
    per_instance = {}
    for flush_commit in (False, True):
        counts = []
        for n in (0, 96):
            run = tmp_path / f"{flush_commit}-{n}"
            url = f"sqlite:///{run / 'flush.db'}"
            upgrade(make_engine(url))
            trace = run / "strace.txt"
            command = [strace, "-f", "-qq", "-c", "-e", "trace=fsync,fdatasync", "-o", str(trace)]
            command += [sys.executable, "-c", FLUSH_CHILD, url, str(run / "spool"), str(n), str(flush_commit)]
            out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
            assert out.returncode == 0, out.stderr
            counts.append(_calls(trace.read_text()))
        per_instance[flush_commit] = (counts[1] - counts[0]) / 96
    print(
        f"flushes per instance: {per_instance[False]:.2f} (commit not flushed), {per_instance[True]:.2f} (flushed)"
    )
    # One per instance, plus one fsync of slots/ per 32 instances (storage/slots.py SLOT_BATCH).
    assert 1.0 <= per_instance[False] <= 1.1, per_instance
    assert 1.9 <= per_instance[True] <= 2.1, per_instance


# One association stores 1 + N new instances of one series, as the receiver does, then exits.
FLUSH_CHILD = """
import datetime as dt, sys
from pathlib import Path
from storage.db import make_engine, make_session_factory
from storage.ingest import AssociationInfo, Ingest
from storage.spool import Spool
from tests.support.instances import ct_chunks, ct_dataset, ct_incoming
url, root, n, flush = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "True"
spool = Spool(root)
spool.open()
ingest = Ingest(make_session_factory(make_engine(url)), spool, flush_commit=flush)
info = AssociationInfo("a" * 36, "SCU", "PACS_TRIAGE", "127.0.0.1", dt.datetime.now(dt.UTC))
for i in range(1 + n):
    ds = ct_dataset(f"1.5.1.{i}", "1.5.2", "1.5.3", fill=i)
    ingest.store(ct_incoming(ds), ct_chunks(ds), info)
"""


def _calls(summary: str) -> int:
    """Total fsync + fdatasync calls in an ``strace -c`` summary."""
    total = 0
    for line in summary.splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync"):
            total += int(parts[3])
    return total


def test_a_receipted_file_that_fails_validation_now_is_kept_aside_not_removed(
    database: Database, tmp_path: Path
) -> None:
    """Its rows lost, a file that today's validation refuses (an upgrade's stricter rule) may still
    be an acknowledged instance: recovery moves it to spool/quarantine/, byte for byte, and logs it."""
    engine = make_engine(database.url)
    upgrade(engine)
    engine.dispose()
    engine, ingest = open_ingest(database.url, tmp_path / "spool")
    ds = ct_dataset("1.2.7.1.1.1", "1.2.7.1.1", "1.2.7.1", fill=1)
    assert ingest.store(ct_incoming(ds), ct_chunks(ds), AFTER, received_at=at(1)) is StoreOutcome.STORED
    path = tmp_path / "spool" / stored_instances(database.url)[ds.SOPInstanceUID].path
    kept = path.read_bytes()
    with ingest.sessions.begin() as session:  # as if the unflushed commit was lost
        session.execute(delete(Instance))
    engine.dispose()

    def stricter(data: bytes) -> IncomingInstance:
        raise ValueError("a rule this version did not have")

    engine = make_engine(database.url)
    recovery = recover_index(make_session_factory(engine), Spool(tmp_path / "spool"), stricter)
    engine.dispose()

    assert recovery == Recovery(recorded=0, refused=1, removed=0)
    assert not path.exists()
    assert (tmp_path / "spool" / "quarantine" / path.name).read_bytes() == kept
