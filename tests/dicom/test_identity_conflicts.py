"""One patient per study, one study per series: contradictions are refused, audited, never merged.

Issue 11 item 2: an instance whose Patient ID (with Issuer of Patient ID) differed from its
stored study's was merged into that study (and into one report). Now refused with 0xC001
(daemon/dicom/status.py: IDENTITY_CONFLICT), recorded as an ``identity_conflict`` event shown
by ``pacs-triage status``; the same for a Series Instance UID reused under another study.
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.association import Association

from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate, pause_reactor, read_quietly
from tests.support.service import Service
from tests.support.stored import assert_spool_consistent, events, stored_instances

REFERENCE = TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
IDENTITY_CONFLICT = 0xC001


def _instance(base: Dataset, study: str, series: str, patient: str, issuer: str | None) -> Dataset:
    ds = copy.deepcopy(base)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = patient
    if issuer is None:
        if "IssuerOfPatientID" in ds:
            del ds.IssuerOfPatientID
    else:
        ds.IssuerOfPatientID = issuer
    return ds


def _send(assoc: Association, ds: Dataset) -> tuple[int, str]:
    pause_reactor(assoc)
    rsp = assoc.send_c_store(ds)
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def test_identity_conflicts_are_refused_recorded_and_never_merged(service: Service) -> None:
    base = read_quietly(REFERENCE)
    study, series = generate_uid(), generate_uid()
    first = _instance(base, study, series, "PAT-1", "HOSP-A")
    refused = {
        # Same study, another patient, in a new series (the full path) ...
        "other patient, new series": _instance(base, study, generate_uid(), "PAT-2", "HOSP-A"),
        # ... and in the series this association just stored into (the receiver's fast path).
        "other patient, same series": _instance(base, study, series, "PAT-2", "HOSP-A"),
        "same Patient ID, other issuer": _instance(base, study, generate_uid(), "PAT-1", "HOSP-B"),
        "series reused under another study": _instance(base, generate_uid(), series, "PAT-1", "HOSP-A"),
    }
    # Not a contradiction: the issuer is simply not stated.
    accepted = _instance(base, study, series, "PAT-1", None)
    assoc = associate(service.port, [(MR_IMAGE, "1.2.840.10008.1.2.1")], calling_ae="IDENTITY_SCU")
    assert assoc.is_established
    try:
        assert _send(assoc, first) == (0, "")
        for case, ds in refused.items():
            status, comment = _send(assoc, ds)
            assert status == IDENTITY_CONFLICT, f"{case}: 0x{status:04X} {comment}"
            assert comment.startswith("identity conflict: "), f"{case}: {comment}"
        assert _send(assoc, accepted) == (0, "")
    finally:
        assoc.release()

    rows = stored_instances(service.database_url)
    assert set(rows) == {str(first.SOPInstanceUID), str(accepted.SOPInstanceUID)}
    assert {r.study_instance_uid for r in rows.values()} == {study}
    assert_spool_consistent(service.spool, service.database_url)
    conflicts = [e for e in events(service.database_url) if e[2] == "identity_conflict"]
    assert len(conflicts) == len(refused)
    summary = service.status_json()
    assert summary["studies"] == 1 and summary["series"] == 1
    assert summary["queue"]["identity_conflicts_total"] == len(refused)
    text = service.cli("status").stdout
    assert f"instances refused, identity conflict (never merged): {len(refused)}" in text
    assert "PAT-2" not in text and "PAT-2" not in service.log_text()  # no patient identifiers shown
    assert "Traceback" not in service.log_text()
