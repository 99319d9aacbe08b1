"""Issue 11 item 9: a peer's strings cannot forge log lines, and INFO carries no patient data or raw UIDs.

A newline in a calling AE title or a request UID used to start a new line of the service log
with whatever text the peer chose. Every peer string is now escaped onto its own line
(``daemon.logs.peer_text``, and the log format as a safety net for libraries' messages), and INFO
lines name studies, instances and jobs by id or by ``daemon.logs.ref`` (a short hash).
"""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from daemon.dicom.scu import send_files
from daemon.logs import ref
from tests.paths import TESTDATA
from tests.support.dicom_bytes import (
    associate,
    dataset_bytes,
    echo_on,
    lenient_uids,
    pynetdicom_config,
    raw_c_store,
)
from tests.support.process import wait_until
from tests.support.service import Service, ServiceFactory

SOURCE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_04.dcm"
CT_IMAGE, EXPLICIT_LE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
FORGED = "FORGED 2026-01-01 00:00:00,000 INFO"
PATIENT_ID, PATIENT_NAME = "PID-4711-SECRET", "SECRET^PATIENT"


def _lines(svc: Service, level: str | None = None) -> list[str]:
    lines = svc.log_text().splitlines()
    return [line for line in lines if level is None or f" {level} " in line[:40]]


def _patient_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    ds = dcmread(SOURCE)
    ds = copy.deepcopy(ds)
    ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "patient.dcm"
    ds.save_as(path, enforce_file_format=True)
    uids = {
        "study": str(ds.StudyInstanceUID),
        "series": str(ds.SeriesInstanceUID),
        "instance": str(ds.SOPInstanceUID),
    }
    return path, uids


def test_peer_strings_cannot_forge_log_lines_and_info_hides_patient_data(
    sqlite_services: ServiceFactory, tmp_path: Path
) -> None:
    svc = sqlite_services(env={"PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "1"})

    # 1. A real association whose calling AE title holds a newline and a forged log line.
    from pynetdicom import _config

    with pynetdicom_config(VALIDATORS={**_config.VALIDATORS, "AE": lambda _value: (True, "")}):
        assoc = associate(svc.port, calling_ae=f"X\n{FORGED}"[:16], timeout=10)
    if assoc.is_established:
        assoc.release()

    # 2. A C-STORE whose Affected SOP Instance UID holds a newline and a forged line.
    assoc = associate(svc.port, [(CT_IMAGE, EXPLICIT_LE)], calling_ae="LOG_SCU")
    assert assoc.is_established
    try:
        with lenient_uids():
            rsp = raw_c_store(
                assoc,
                dataset_bytes(SOURCE),
                sop_class=CT_IMAGE,
                sop_instance=f"1.2\n{FORGED}"[:60],
            )
        assert rsp.status is not None and rsp.status != 0x0000
        assert echo_on(assoc) == 0
    finally:
        assoc.release()

    # 3. A real, valid instance with a known patient: stored, its study completed and routed.
    path, uids = _patient_file(tmp_path)
    (result,) = send_files(svc.peer, [path], calling_ae="LOG_SCU")
    assert result.ok, result
    wait_until(
        lambda: any("queued" in line for line in _lines(svc, "INFO")),
        timeout=60,
        what="the study's completion and job to be logged",
    )

    lines = _lines(svc)
    forged = [line for line in lines if line.startswith(("FORGED", "X", "1.2"))]
    assert forged == [], f"log lines forged by a peer: {forged}"
    assert any(FORGED[:10] in line for line in lines), "the attempts are logged, escaped, on real lines"
    info = "\n".join(_lines(svc, "INFO"))
    for secret in (PATIENT_ID, PATIENT_NAME, *uids.values()):
        assert secret not in info, f"{secret!r} appears at INFO"
    assert ref(uids["study"]) in info, "the study is named at INFO by its reference"
