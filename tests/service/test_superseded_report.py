"""Partial reports superseded (issue 11, item 11): late instances after a delivered report give a
new report that names the delivered one in its Predecessor Documents Sequence (PS3.3 C.17.2), so
viewers show only the current one. A real ``pacs-triage serve`` (SQLite and PostgreSQL) and a dcmtk
storescp as the PACS."""

from __future__ import annotations

import uuid
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from daemon.dicom.scu import send_files
from tests.support.process import wait_until
from tests.support.queue_db import ct_series
from tests.support.service import ServiceFactory
from tests.support.storescp import Storescp


def _reports(storescp: Storescp) -> list[Dataset]:
    found: list[Dataset] = []
    for path in storescp.files():
        try:
            ds = dcmread(path)
        except (EOFError, ValueError, OSError):
            continue  # being written
        if ds.get("Modality") == "SR":
            found.append(ds)
    return found


def test_a_report_superseded_by_late_instances_names_its_predecessor(
    tmp_path: Path, services: ServiceFactory, storescp: Storescp
) -> None:
    storescp.start()
    service = services(
        env={
            "PACS_TRIAGE_DESTINATION": storescp.destination,
            "PACS_TRIAGE_WORKERS__COUNT": "1",
            "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.25",
            "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "0.5",
            "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.25",
            "PACS_TRIAGE_DISPATCH__POLL_SECONDS": "0.25",
        }
    )
    study = f"2.25.{uuid.uuid4().int}"
    files = ct_series(tmp_path / "study", study, study + ".1", 5)
    assert all(r.status == 0 for r in send_files(service.peer, files[:3], calling_ae="CT_SCANNER"))
    (first,) = wait_until(lambda: _reports(storescp), timeout=120, what="the first report at the PACS")
    assert "PredecessorDocumentsSequence" not in first

    assert all(r.status == 0 for r in send_files(service.peer, files[3:], calling_ae="CT_SCANNER"))
    reports = wait_until(
        lambda: found if len(found := _reports(storescp)) == 2 else None,
        timeout=120,
        what="the superseding report at the PACS",
    )
    (second,) = [r for r in reports if r.SOPInstanceUID != first.SOPInstanceUID]
    assert second.StudyInstanceUID == first.StudyInstanceUID == study
    (item,) = second.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == study
    (series,) = item.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (sop,) = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (
        first.SOPClassUID,
        first.SOPInstanceUID,
    )
