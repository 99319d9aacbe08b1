"""Recovery after a receiver dies between flushing an instance and committing its row (issue 15).

The hot path (storage/spool.py ``Spool.store``) flushes the bytes, with their receipt, into a
slot, renames the slot into objects/ without a directory fsync, and the row is committed after.
A real child process is killed with SIGKILL at each point; the next start (``Spool.open`` +
``recover_index``, as ``daemon.service.node.open_node`` runs them) must record every complete
instance again from its receipt (it cannot tell one never acknowledged from one whose commit a
power cut took), remove torn ones and files without a receipt, and leave every row at its file.
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.dicom.stored import describe_stored
from storage.db import make_engine, make_session_factory
from storage.ingest import AssociationInfo, Ingest, StoreOutcome
from storage.migrate import upgrade
from storage.models import Association, Instance
from storage.recovery import Recovery, recover_index
from storage.spool import Spool
from tests.support.instances import ct_chunks, ct_dataset, ct_incoming

ASSOC = AssociationInfo(
    "b" * 36, "MODALITY", "PACS_TRIAGE", "127.0.0.1", dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
)
CHILD_ASSOC = AssociationInfo(
    "c" * 36, "DYING_SCU", "PACS_TRIAGE", "10.0.0.7", dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
)
RECEIVED = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)

# The child stores one instance (with its receipt) and kills itself: after the slot's flush
# ("slot", before the rename), after the file is in place ("placed", before any row is
# committed), or halfway through writing the slot ("torn").
CHILD = """
import datetime as dt, os, signal, sys
from pathlib import Path
from storage.receipt import AssociationInfo, Delivery, Receipt, digest, seal
from storage.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.open()
header = Path(sys.argv[3]).read_bytes()
data = Path(sys.argv[4]).read_bytes()
at = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
delivery = Delivery(AssociationInfo("c" * 36, "DYING_SCU", "PACS_TRIAGE", "10.0.0.7", at), at)
if sys.argv[2] == "placed":
    spool.store([header, data], sys.argv[5], delivery)
else:
    sha, size = digest([header, data])
    sealed = b"".join(seal([header, data], Receipt(delivery, sha, size)))
    slot = spool._slots.take()
    fd = os.open(slot, os.O_WRONLY)
    os.write(fd, sealed if sys.argv[2] == "slot" else sealed[: len(sealed) - 7])
    os.fdatasync(fd)
    os.close(fd)
os.kill(os.getpid(), signal.SIGKILL)
"""


def instance(n: int) -> tuple[str, tuple[bytes, bytes]]:
    ds = ct_dataset(f"1.2.3.4.{n}", "1.2.3.2", "1.2.3.1", fill=n)
    return str(ds.SOPInstanceUID), ct_chunks(ds)


def store(ingest: Ingest, n: int) -> StoreOutcome:
    ds = ct_dataset(f"1.2.3.4.{n}", "1.2.3.2", "1.2.3.1", fill=n)
    return ingest.store(ct_incoming(ds), ct_chunks(ds), ASSOC, received_at=RECEIVED)


@pytest.fixture
def ingest(database_url: str, tmp_path: Path) -> Ingest:
    engine = make_engine(database_url)
    upgrade(engine)
    spool = Spool(tmp_path / "spool")
    spool.open()
    return Ingest(make_session_factory(engine), spool)


def die_while_storing(spool: Spool, mode: str, n: int, tmp_path: Path) -> None:
    uid, (header, data) = instance(n)
    (tmp_path / "header").write_bytes(header)
    (tmp_path / "data").write_bytes(data)
    argv = [str(spool.root), mode, str(tmp_path / "header"), str(tmp_path / "data"), uid]
    child = subprocess.run([sys.executable, "-c", CHILD, *argv], timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child


def restart(ingest: Ingest) -> tuple[Spool, Recovery]:
    """What the next start does: open the spool (slots of dead processes), then recover the index."""
    spool = Spool(ingest.spool.root)
    spool.open()
    return spool, recover_index(ingest.sessions, spool, describe_stored)


def files_of_record(spool: Spool) -> set[str]:
    return {p.relative_to(spool.root).as_posix() for p in spool.objects.glob("*/*/*.dcm")}


def foreign_slots(spool: Spool) -> list[Path]:
    """Slots not of this (test) process: the dead child's."""
    return [p for p in spool.slots.iterdir() if p.name.split(".")[1] != str(os.getpid())]


def rows(ingest: Ingest) -> dict[str, Instance]:
    with ingest.sessions() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


@pytest.mark.parametrize("mode", ["slot", "placed"])
def test_killed_after_the_flush_is_recorded_from_its_receipt(
    ingest: Ingest, tmp_path: Path, mode: str
) -> None:
    """Complete and flushed: recorded again with the child's association; the resend is a duplicate."""
    assert store(ingest, 1) is StoreOutcome.STORED
    die_while_storing(ingest.spool, mode, 2, tmp_path)
    left = foreign_slots(ingest.spool) if mode == "slot" else files_of_record(ingest.spool)
    assert len(left) >= 1, "the child did not get as far as the test needs"

    spool, recovery = restart(ingest)

    assert recovery == Recovery(recorded=1, refused=0, removed=0)
    recovered = rows(ingest)["1.2.3.4.2"]
    assert set(rows(ingest)) == {"1.2.3.4.1", "1.2.3.4.2"}
    assert (recovered.calling_ae, recovered.source_address, recovered.association_id) == (
        "DYING_SCU",
        "10.0.0.7",
        "c" * 36,
    )
    with ingest.sessions() as session:
        association = session.get(Association, "c" * 36)
        assert association is not None and association.calling_ae == "DYING_SCU"
    assert files_of_record(spool) == {r.path for r in rows(ingest).values()}
    assert foreign_slots(spool) == []  # the dead child's slots, used or not, are gone
    assert store(Ingest(ingest.sessions, spool), 2) is StoreOutcome.DUPLICATE


def test_a_torn_slot_and_files_without_a_receipt_are_removed(ingest: Ingest, tmp_path: Path) -> None:
    """Never acknowledged: a slot cut short, a placed file that cannot carry a receipt."""
    assert store(ingest, 1) is StoreOutcome.STORED
    die_while_storing(ingest.spool, "torn", 2, tmp_path)
    assert len(foreign_slots(ingest.spool)) >= 1
    uid, chunks = instance(3)
    ingest.spool.store(chunks, uid)  # placed without a receipt (what every store did before)

    spool, recovery = restart(ingest)

    assert recovery == Recovery(recorded=0, refused=0, removed=1)
    assert set(rows(ingest)) == {"1.2.3.4.1"}
    assert files_of_record(spool) == {rows(ingest)["1.2.3.4.1"].path}
    assert foreign_slots(spool) == []


def test_a_committed_instance_still_in_its_slot_is_moved_into_place(ingest: Ingest) -> None:
    """A power cut that lost the rename but not the row: the restart puts the bytes back in place.

    The slot is named after the receiver's own pid but an earlier boot, as after a power cut the
    new receiver may well get the pid of the old one.
    """
    assert store(ingest, 3) is StoreOutcome.STORED
    row = rows(ingest)["1.2.3.4.3"]
    data = (ingest.spool.root / row.path).read_bytes()
    host = os.uname().nodename
    lost = ingest.spool.slots / f"{host}.{os.getpid()}.0123456789abcdef-{'0' * 32}.slot"
    os.replace(ingest.spool.root / row.path, lost)  # as if the rename never reached the disk
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    torn = ingest.spool.slots / f"{host}.{dead.stdout.strip()}.1.slot"
    torn.write_bytes(data[:100])  # a slot being written when the power went: never acknowledged

    spool, recovery = restart(ingest)

    assert recovery == Recovery(recorded=0, refused=0, removed=0)
    assert (spool.root / row.path).read_bytes() == data
    assert files_of_record(spool) == {row.path}
    assert not lost.exists() and not torn.exists()
