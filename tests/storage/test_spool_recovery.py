"""Recovery after a receiver dies between flushing an instance and committing its row (issue 15).

The hot path (storage/spool.py ``Spool.store``) flushes the bytes into a slot, renames the slot
into objects/ without a directory fsync, and the row is committed after. A real child process
is killed with SIGKILL at each point; the next start (``Spool.open`` + ``remove_orphans``, as
``daemon.service.node.open_node`` runs them) must leave exactly the committed instances, each at
its file of record. On SQLite and PostgreSQL.
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

from daemon.dicom.file_meta import file_header
from storage.db import make_engine, make_session_factory
from storage.file_records import remove_orphans
from storage.ingest import AssociationInfo, IncomingInstance, Ingest, StoreOutcome
from storage.migrate import upgrade
from storage.models import Instance
from storage.spool import Spool

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ASSOC = AssociationInfo("b" * 36, "MODALITY", "PACS_TRIAGE", "127.0.0.1", dt.datetime.now(dt.UTC))

# The child stores one instance and kills itself: after the slot's flush ("slot", before the
# rename) or after the file is in place ("placed", before any row is committed).
CHILD = """
import os, signal, sys
from pathlib import Path
from storage.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.open()
data = Path(sys.argv[3]).read_bytes()
if sys.argv[2] == "slot":
    slot = spool._slots.take()
    fd = os.open(slot, os.O_WRONLY)
    os.write(fd, data)
    os.fdatasync(fd)
    os.close(fd)
else:
    spool.store([data], sys.argv[4])
os.kill(os.getpid(), signal.SIGKILL)
"""


def instance_bytes(uid: str) -> bytes:
    return (
        file_header(CT, uid, EXPLICIT_LE) + b"\x08\x00\x16\x00UI\x1a\x00" + CT.encode() + b"\0" + b"x" * 999
    )


def incoming(uid: str) -> IncomingInstance:
    return IncomingInstance("1.2.3.1", "1.2.3.2", uid, CT, EXPLICIT_LE, modality="CT")


@pytest.fixture
def ingest(database_url: str, tmp_path: Path) -> Ingest:
    engine = make_engine(database_url)
    upgrade(engine)
    spool = Spool(tmp_path / "spool")
    spool.open()
    return Ingest(make_session_factory(engine), spool)


def die_while_storing(spool: Spool, mode: str, uid: str, tmp_path: Path) -> None:
    source = tmp_path / f"{uid}.dcm"
    source.write_bytes(instance_bytes(uid))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(spool.root), mode, str(source), uid], timeout=60, check=False
    )
    assert child.returncode == -signal.SIGKILL, child


def restart(ingest: Ingest) -> Spool:
    """What the next start does: open the spool (slots of dead processes), then remove orphans."""
    spool = Spool(ingest.spool.root)
    spool.open()
    remove_orphans(ingest.sessions, spool)
    return spool


def files_of_record(spool: Spool) -> set[str]:
    return {p.relative_to(spool.root).as_posix() for p in spool.objects.glob("*/*/*.dcm")}


def foreign_slots(spool: Spool) -> list[Path]:
    """Slots not of this (test) process: the dead child's."""
    return [p for p in spool.slots.iterdir() if p.name.split(".")[1] != str(os.getpid())]


def rows(ingest: Ingest) -> dict[str, Instance]:
    with ingest.sessions() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


@pytest.mark.parametrize("mode", ["slot", "placed"])
def test_killed_before_the_commit_leaves_nothing(ingest: Ingest, tmp_path: Path, mode: str) -> None:
    """Never acknowledged: after the restart neither a file nor a row is left; the resend stores it."""
    assert ingest.store(incoming("1.2.3.4.1"), [instance_bytes("1.2.3.4.1")], ASSOC) is StoreOutcome.STORED
    die_while_storing(ingest.spool, mode, "1.2.3.4.2", tmp_path)
    left = foreign_slots(ingest.spool) if mode == "slot" else files_of_record(ingest.spool)
    assert len(left) >= 1, "the child did not get as far as the test needs"

    spool = restart(ingest)

    assert set(rows(ingest)) == {"1.2.3.4.1"}
    assert files_of_record(spool) == {rows(ingest)["1.2.3.4.1"].path}
    assert foreign_slots(spool) == []  # the dead child's slots, used or not, are gone
    again = Ingest(ingest.sessions, spool)
    assert again.store(incoming("1.2.3.4.2"), [instance_bytes("1.2.3.4.2")], ASSOC) is StoreOutcome.STORED
    assert files_of_record(spool) == {r.path for r in rows(ingest).values()}


def test_a_committed_instance_still_in_its_slot_is_moved_into_place(ingest: Ingest) -> None:
    """A power cut that lost the rename but not the row: the restart puts the bytes back in place."""
    data = instance_bytes("1.2.3.4.3")
    assert ingest.store(incoming("1.2.3.4.3"), [data], ASSOC) is StoreOutcome.STORED
    row = rows(ingest)["1.2.3.4.3"]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lost = ingest.spool.slots / f"{os.uname().nodename}.{dead.stdout.strip()}.0.slot"
    os.replace(ingest.spool.root / row.path, lost)  # as if the rename never reached the disk
    torn = ingest.spool.slots / f"{os.uname().nodename}.{dead.stdout.strip()}.1.slot"
    torn.write_bytes(data[:100])  # a slot being written when the power went: never acknowledged

    spool = restart(ingest)

    assert (spool.root / row.path).read_bytes() == data
    assert files_of_record(spool) == {row.path}
    assert foreign_slots(spool) == []
