"""Every real series of the shared test data is received and stored byte for byte (PS3.4 B.2.2).

Senders: pynetdicom (``daemon.dicom.scu.send_files``, the data set sent as it is in the file) and
dcmtk ``storescu`` (proposing each file's own transfer syntax). ``storescu`` re-encodes some
data sets before sending (it writes undefined-length sequences with explicit lengths), so what
arrived on the wire is taken from dcmtk's own ``storescp +B`` (bit-preserving) fed by the same
``storescu`` command; the receiver must store exactly that. Records are checked on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.dicom.scu import send_files
from tests.paths import TESTDATA
from tests.support.dicom_bytes import content_digest, dataset_bytes, echo_status, read_quietly
from tests.support.peers import free_port, need_dcmtk, storescu
from tests.support.process import clean_env, wait_until
from tests.support.service import ServiceFactory
from tests.support.stored import StoredInstance, assert_spool_consistent, stored_instances

SERIES_FOLDERS = [
    TESTDATA / "ct_series" / "abdomen_20",
    TESTDATA / "ct_series" / "gantry_tilt",
    TESTDATA / "mr_series" / "sag_t1_fl2d_HFS",
    TESTDATA / "enhanced_multiframe",
]
# The transfer-syntax family shares SOP Instance UIDs (one image in many encodings): each file is a
# replacement of the previous one, so each is sent and checked on its own.
TRANSFER_SYNTAX_FOLDER = TESTDATA / "transfer_syntaxes"
SPOOL_PATH = re.compile(r"objects/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}-[0-9a-f]{64}\.dcm")


@dataclass(frozen=True)
class Source:
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str

    @classmethod
    def read(cls, path: Path) -> Source:
        ds = read_quietly(path, stop_before_pixels=True)
        return cls(
            path=path,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        )


def rounds() -> list[list[Source]]:
    """Groups of files with distinct SOP Instance UIDs, sent and checked one group at a time."""
    series = [Source.read(p) for folder in SERIES_FOLDERS for p in sorted(folder.glob("*.dcm"))]
    assert len({s.sop_instance_uid for s in series}) == len(series)
    singles = [[Source.read(p)] for p in sorted(TRANSFER_SYNTAX_FOLDER.glob("*.dcm"))]
    return [series, *singles]


@contextlib.contextmanager
def reference_storescp(workdir: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp in bit-preserving mode: what storescu really put on the wire."""
    out = workdir / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    cmd = [need_dcmtk("storescp"), "+B", "+xa", "-od", str(out), "-aet", "REFERENCE", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    try:
        wait_until(
            lambda: echo_status(port, called_ae="REFERENCE", timeout=2.0) == 0,
            timeout=30,
            what="dcmtk storescp to listen",
        )
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def send_with_storescu(
    service_port: int, sources: list[Source], reference: tuple[int, Path]
) -> dict[str, bytes]:
    """Send with storescu (one call per transfer syntax); return the bytes it sent, by SOP Instance UID."""
    ref_port, ref_dir = reference
    by_syntax: dict[str, list[Path]] = {}
    for s in sources:
        by_syntax.setdefault(s.transfer_syntax_uid, []).append(s.path)
    for files in by_syntax.values():
        for port, called in ((ref_port, "REFERENCE"), (service_port, "PACS_TRIAGE")):
            out = storescu(port, files, called_ae=called)
            assert out.returncode == 0, f"storescu to {called} failed:\n{out.stdout}\n{out.stderr}"
    sent: dict[str, bytes] = {}
    for received in ref_dir.iterdir():  # storescp wrote each file before it answered storescu
        sent[str(read_quietly(received, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(received)
        received.unlink()
    assert set(sent) == {s.sop_instance_uid for s in sources}, "storescp did not receive every file"
    return sent


def check_stored(
    source: Source, row: StoredInstance | None, spool: Path, expected: bytes, calling_ae: str
) -> list[str]:
    """Differences between what was sent and what is stored/recorded (empty: all good)."""
    name = source.path.relative_to(TESTDATA)
    if row is None:
        return [f"{name}: no instance row"]
    problems = []
    if not SPOOL_PATH.fullmatch(row.path):
        problems.append(f"{name}: unexpected spool path {row.path!r}")
    stored = (spool / row.path).resolve()
    if not stored.is_relative_to((spool / "objects").resolve()) or not stored.is_file():
        return [*problems, f"{name}: stored file {stored} missing or outside the spool"]
    if dataset_bytes(stored) != expected:
        problems.append(f"{name}: stored data set differs from the bytes sent")
    if (row.sha256, row.size_bytes) != content_digest(stored):
        problems.append(f"{name}: sha256/size of the row do not match the file")
    meta = read_quietly(stored, stop_before_pixels=True).file_meta
    expected_row = (
        source.sop_class_uid,
        source.transfer_syntax_uid,
        source.series_instance_uid,
        source.study_instance_uid,
        calling_ae,
        "127.0.0.1",
    )
    actual_row = (
        row.sop_class_uid,
        row.transfer_syntax_uid,
        row.series_instance_uid,
        row.study_instance_uid,
        row.calling_ae,
        row.source_address,
    )
    if actual_row != expected_row:
        problems.append(f"{name}: row {actual_row} != expected {expected_row}")
    if (meta.TransferSyntaxUID, meta.MediaStorageSOPInstanceUID) != (
        source.transfer_syntax_uid,
        source.sop_instance_uid,
    ):
        problems.append(f"{name}: stored file meta does not name its transfer syntax / instance")
    return problems


@pytest.mark.parametrize("sender", ["pynetdicom", "storescu"])
def test_every_series_is_stored_byte_identical(sender: str, services: ServiceFactory, tmp_path: Path) -> None:
    svc = services()
    calling_ae = "PYNETDICOM_SCU" if sender == "pynetdicom" else "DCMTK_SCU"
    problems: list[str] = []
    groups = rounds()
    with contextlib.ExitStack() as stack:
        reference = stack.enter_context(reference_storescp(tmp_path)) if sender == "storescu" else None
        for group in groups:
            if reference is None:
                results = list(send_files(svc.peer, [s.path for s in group], calling_ae=calling_ae))
                failed = [f"{r.path.name}: {r.status} {r.comment}" for r in results if not r.ok]
                assert not failed, f"pynetdicom sends refused: {failed}"
                sent = {s.sop_instance_uid: dataset_bytes(s.path) for s in group}
            else:
                sent = send_with_storescu(svc.port, group, reference)
            rows = stored_instances(svc.database_url)
            for source in group:
                row = rows.get(source.sop_instance_uid)
                problems += check_stored(source, row, svc.spool, sent[source.sop_instance_uid], calling_ae)
    assert not problems, "\n".join(problems)
    assert sum(len(g) for g in groups) == 71 + 24

    # The transfer-syntax family replaced its shared instances; the spool holds only files of record.
    rows = assert_spool_consistent(svc.spool, svc.database_url)
    all_sources = [s for g in groups for s in g]
    assert set(rows) == {s.sop_instance_uid for s in all_sources}
    status = svc.status_json()
    assert status["instances"] == len(rows)
    assert status["series"] == len({s.series_instance_uid for s in all_sources})
    assert status["studies"] == len({s.study_instance_uid for s in all_sources})
    assert svc.echo() == 0
    assert "Traceback" not in svc.log_text()
