"""A power cut after a resend raced a new version of the same instance (issue 15 review).

Two associations record two versions of one instance. Each store reads its receipt time before
it takes the instance lock, so the store that commits last (the version of record, acknowledged)
may carry the earlier receipt. Its commit (no flush) replaces the other version's row and removes
that version's file durably; a power cut then takes the commit. The next start must not treat
the file of the version of record as older news and remove it too: that would lose both versions
(an acknowledged instance gone, a row naming no file). The commits are lost for real, as in
tests/storage/test_power_cut.py; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom.dsutils import decode

from daemon.dicom.encoding import check_encoding
from daemon.dicom.stored import describe_stored
from daemon.dicom.validation import validate_received
from storage.db import make_engine, make_session_factory
from storage.ingest import StoreOutcome
from storage.migrate import upgrade
from storage.receipt import digest
from storage.recovery import Recovery, recover_index
from storage.spool import Spool
from tests.storage.test_power_cut import AFTER, BEFORE, S1, SE1, T0, Database, _calls, at, open_ingest
from tests.support.dicom_bytes import content_digest
from tests.support.instances import CT, EXPLICIT_LE, ct_chunks, ct_dataset, ct_incoming
from tests.support.peers import need_tool
from tests.support.stored import assert_spool_consistent, stored_instances


@pytest.fixture
def database(database_url: str, request: pytest.FixtureRequest) -> Database:
    is_pg = database_url.startswith("postgresql")
    return Database(database_url, request.getfixturevalue("pg_admin") if is_pg else None)


def test_the_version_committed_last_survives_when_its_receipt_is_earlier(
    database: Database, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    engine = make_engine(database.url)
    upgrade(engine)
    engine.dispose()
    uid = "1.2.9.1.1.5"
    v1 = ct_dataset(uid, SE1, S1, patient="P1", fill=1)
    v2 = ct_dataset(uid, SE1, S1, patient="P1", fill=2)

    engine, ingest = open_ingest(database.url, root)
    assert ingest.store(ct_incoming(v1), ct_chunks(v1), BEFORE, received_at=T0) is StoreOutcome.STORED
    # v2 arrives at at(2) and commits first; the cut keeps this commit (flushed later, say).
    assert ingest.store(ct_incoming(v2), ct_chunks(v2), AFTER, received_at=at(2)) is StoreOutcome.REPLACED
    v2_path = stored_instances(database.url)[uid].path
    engine.dispose()
    database.snapshot()

    # A resend of v1 read the clock (at(1)) before v2's store did, but took the instance lock
    # after it: it is the version of record, acknowledged, and v2's file is removed.
    engine, ingest = open_ingest(database.url, root)
    assert ingest.store(ct_incoming(v1), ct_chunks(v1), AFTER, received_at=at(1)) is StoreOutcome.REPLACED
    v1_path = stored_instances(database.url)[uid].path
    assert not (root / v2_path).exists() and (root / v1_path).exists()
    engine.dispose()

    database.lose_commits_since_snapshot()  # the resend's commit (no flush) is gone
    assert stored_instances(database.url)[uid].path == v2_path

    engine = make_engine(database.url)
    spool = Spool(root)
    spool.open()
    recover_index(make_session_factory(engine), spool, describe_stored)
    engine.dispose()

    rows = assert_spool_consistent(root, database.url)  # every row at its file, every file a row
    assert set(rows) == {uid}
    assert rows[uid].path == v1_path
    assert (rows[uid].sha256, rows[uid].size_bytes) == digest(ct_chunks(v1)) == content_digest(root / v1_path)


def test_file_meta_elements_left_in_the_data_set_do_not_refuse_a_recovered_file(
    database: Database, tmp_path: Path
) -> None:
    """Some senders leave file meta elements (group 0002) in the data set they send.

    The receiver accepts it (the same checks as daemon/dicom/scp.py) and stores the data set byte
    for byte after its own meta group; recovery must read the file meta from that group only,
    not take the sender's (0002,0003) for ours and refuse (then remove) an acknowledged instance.
    """
    root = tmp_path / "spool"
    engine = make_engine(database.url)
    upgrade(engine)
    engine.dispose()
    database.snapshot()
    ds = ct_dataset("1.2.9.1.1.8", SE1, S1, patient="P1", fill=3)
    header, body = ct_chunks(ds)
    uid = b"9.9.9.9\0"  # (0002,0003) Media Storage SOP Instance UID naming another instance
    stream = struct.pack("<HH", 0x0002, 0x0003) + b"UI" + struct.pack("<H", len(uid)) + uid + body
    check_encoding(stream, EXPLICIT_LE)
    received = decode(BytesIO(stream), False, True)
    incoming = validate_received(
        received,
        request_sop_class=CT,
        request_sop_instance=ds.SOPInstanceUID,
        transfer_syntax=EXPLICIT_LE,
        is_image=True,
    )
    assert incoming.sop_instance_uid == ds.SOPInstanceUID

    engine, ingest = open_ingest(database.url, root)
    assert ingest.store(incoming, (header, stream), AFTER, received_at=at(1)) is StoreOutcome.STORED
    path = stored_instances(database.url)[ds.SOPInstanceUID].path
    engine.dispose()
    database.lose_commits_since_snapshot()

    engine = make_engine(database.url)
    spool = Spool(root)
    spool.open()
    recovery = recover_index(make_session_factory(engine), spool, describe_stored)
    engine.dispose()

    assert recovery == Recovery(recorded=1, refused=0, removed=0)
    rows = assert_spool_consistent(root, database.url)
    assert set(rows) == {ds.SOPInstanceUID} and rows[ds.SOPInstanceUID].path == path
    assert (rows[ds.SOPInstanceUID].sha256, rows[ds.SOPInstanceUID].size_bytes) == digest((header, stream))


def test_a_store_that_finds_its_bytes_in_place_flushes_its_commit(tmp_path: Path) -> None:
    """The ack of a store that wrote no file (its bytes were in place) rests on its commit alone.

    The file in place carries another delivery's receipt (here: a store that failed and whose
    removal failed too; likewise a file of a purged study whose removal has not happened yet), so
    recovery could not rebuild this store's rows from it: it must not commit them without a flush.
    strace counts fsync + fdatasync of a child that stores one instance, with and without then
    storing, from another association, an instance whose bytes are in place: at least one more.
    """
    strace = need_tool("strace")
    counts = []
    for final in (False, True):
        run = tmp_path / str(final)
        url = f"sqlite:///{run / 'reuse.db'}"
        upgrade(make_engine(url))
        trace = run / "strace.txt"
        command = [strace, "-f", "-qq", "-c", "-e", "trace=fsync,fdatasync", "-o", str(trace)]
        command += [sys.executable, "-c", REUSE_CHILD, url, str(run / "spool"), str(final)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        counts.append(_calls(trace.read_text()))
    assert counts[1] - counts[0] >= 1, counts


REUSE_CHILD = """
import datetime as dt, sys
from pathlib import Path
from storage.db import make_engine, make_session_factory
from storage.ingest import AssociationInfo, Ingest, StoreOutcome
from storage.receipt import Delivery
from storage.spool import Spool
from tests.support.instances import ct_chunks, ct_dataset, ct_incoming
url, root, final = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "True"
spool = Spool(root)
spool.open()
ingest = Ingest(make_session_factory(make_engine(url)), spool, flush_commit=False)
now = dt.datetime.now(dt.UTC)
failed = AssociationInfo("f" * 36, "FAILED_SCU", "PACS_TRIAGE", "127.0.0.1", now)
info = AssociationInfo("a" * 36, "SCU", "PACS_TRIAGE", "127.0.0.1", now)
first = ct_dataset("1.5.1.1", "1.5.2", "1.5.3", fill=1)
assert ingest.store(ct_incoming(first), ct_chunks(first), info) is StoreOutcome.STORED
left = ct_dataset("1.5.1.2", "1.5.2", "1.5.3", fill=2)
spool.store(ct_chunks(left), left.SOPInstanceUID, Delivery(failed, now))
if final:
    assert ingest.store(ct_incoming(left), ct_chunks(left), info) is StoreOutcome.STORED
"""
