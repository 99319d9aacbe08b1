"""A new version of an instance and a resend of the old one, racing on separate associations.

Issue 11 item 1: the replace path unlinked the superseded file outside the row's lock, so in
some interleavings both stores were acknowledged and the row named a deleted file. Required:
after any interleaving the row names an existing file that holds one of the acknowledged
versions, and the spool holds no file that no row names.
"""

from __future__ import annotations

import copy
import threading

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom.association import Association

from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate, content_digest, pause_reactor, read_quietly
from tests.support.service import Service, ServiceFactory
from tests.support.stored import assert_spool_consistent, spool_objects, stored_instances

REFERENCE = TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ROUNDS = 50


def _version(base: Dataset, sop_instance: str, label: str) -> Dataset:
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = sop_instance
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    ds.ImageComments = label
    return ds


def _race(service: Service, datasets: list[Dataset]) -> list[int | None]:
    """Send each data set on its own, already established association, all released at once."""
    assocs: list[Association] = []
    for n in range(len(datasets)):
        assoc = associate(service.port, [(MR_IMAGE, EXPLICIT_LE)], calling_ae=f"RACE_{n}")
        assert assoc.is_established
        assocs.append(assoc)
    statuses: list[int | None] = [None] * len(datasets)
    start = threading.Barrier(len(datasets))

    def send(n: int) -> None:
        pause_reactor(assocs[n])
        start.wait(timeout=30)
        rsp = assocs[n].send_c_store(datasets[n])
        statuses[n] = int(rsp.Status) if "Status" in rsp else None

    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(datasets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for assoc in assocs:
        assoc.release()
    return statuses


def test_new_version_racing_a_resend_never_loses_an_acknowledged_instance(service: Service) -> None:
    base = read_quietly(REFERENCE)
    for round_ in range(ROUNDS):
        uid = generate_uid()
        versions = [_version(base, uid, f"round {round_} version {v}") for v in range(3)]
        first = associate(service.port, [(MR_IMAGE, EXPLICIT_LE)], calling_ae="RACE_FIRST")
        try:
            assert first.send_c_store(versions[0]).Status == 0
        finally:
            first.release()
        # 2, 3 or 4 senders: the new version(s) against resends of the stored one.
        senders = [versions[1], versions[0], versions[2], versions[0]][: 2 + round_ % 3]
        statuses = _race(service, senders)
        assert all(s == 0 for s in statuses), f"round {round_}: {statuses}"
        acknowledged = {str(ds.ImageComments) for ds in senders}
        row = stored_instances(service.database_url)[uid]
        path = service.spool / row.path
        assert path.exists(), f"round {round_}: the row names a deleted file (acknowledged instance lost)"
        assert content_digest(path)[0] == row.sha256, f"round {round_}"
        assert str(read_quietly(path).ImageComments) in acknowledged, f"round {round_}"
        # Superseded files are gone once the round is over: one file per row.
        assert len(spool_objects(service.spool)) == round_ + 1, f"round {round_}: superseded files kept"
    assert_spool_consistent(service.spool, service.database_url)


def test_start_up_removes_files_that_no_row_names(services: ServiceFactory) -> None:
    """A crash between placing a file and committing its row leaves an orphan: the next start removes it."""
    svc = services()
    assoc = associate(svc.port, [(MR_IMAGE, EXPLICIT_LE)], calling_ae="ORPHAN_SCU")
    try:
        assert assoc.send_c_store(read_quietly(REFERENCE)).Status == 0
    finally:
        assoc.release()
    assert svc.stop() == 0
    (kept,) = spool_objects(svc.spool).values()
    orphan = svc.spool / "objects" / "ab" / "cd" / ("ab" + "cd" * 31 + "-" + "0" * 64 + ".dcm")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(kept.read_bytes())
    foreign = svc.spool / "objects" / "ab" / "notes.txt"  # not a name the spool makes: left alone
    foreign.write_text("an operator's note")

    restarted = services(home=svc.home)
    assert not orphan.exists()
    assert kept.exists() and foreign.exists()
    assert "removed 1 spool files that no instance names" in restarted.log_text()
    foreign.unlink()
    assert_spool_consistent(restarted.spool, restarted.database_url)
