"""Malformed input gets a defined outcome, nothing lands outside the spool, the service keeps serving.

Three ways in: our SCU (``send_files``, what an operator's ``pacs-triage send`` does), the raw
"path form" (request UIDs from the file meta, data set bytes exactly as in the file, so the
receiver sees every defect), and hand-made requests whose UIDs differ from, or abuse, those of
the data set (PS3.4 B.2.3: A900 for a mismatch, C000 for what cannot be understood).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from daemon.dicom.scu import send_files
from tests.paths import TESTDATA
from tests.support.dicom_bytes import (
    associate,
    dataset_bytes,
    echo_on,
    encode_dataset,
    pynetdicom_config,
    raw_c_store,
    read_quietly,
)
from tests.support.service import Service, ServiceFactory
from tests.support.stored import all_files, spool_objects, spool_temp_files, stored_instances

# pydicom warns while our SCU reads these files; the warnings are the point of the files.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MALFORMED = TESTDATA / "malformed"
C000, A900 = 0xC000, 0xA900
NOT_SENT = None  # our SCU refuses locally: no DIMSE status

# What `pacs-triage send` (daemon.dicom.scu.send_files) gets for each file, sent on its own.
EXPECTED_SEND: dict[str, int | None] = {
    "01_truncated_in_pixeldata.dcm": C000,
    "02_truncated_in_header.dcm": C000,
    "03_missing_sop_instance_uid.dcm": NOT_SENT,  # file meta and data set disagree: named, not sent
    "04_sop_instance_uid_path_traversal.dcm": C000,
    "05_sop_instance_uid_too_long.dcm": NOT_SENT,  # pynetdicom will not put a 81-character UID in a request
    "06_sop_instance_uid_empty.dcm": C000,
    "07_bad_dicm_prefix.dcm": NOT_SENT,  # not a Part 10 file
    "08_pixeldata_length_mismatch.dcm": C000,
    "09_transfer_syntax_mismatch.dcm": NOT_SENT,  # read as the meta says (big endian): its UIDs disagree
    "10_not_dicom.dcm": NOT_SENT,
    "11_sop_class_mismatch_meta_vs_dataset.dcm": NOT_SENT,  # meta says CT, data set MR: named, not sent
    "12_empty_file.dcm": NOT_SENT,
    "13_anonymizer_blanked_uids.dcm": NOT_SENT,  # the meta's UIDs are not the (blank) data set's
}

# The raw path form: what the receiver answers to each file's own bytes (even the over-long UID).
EXPECTED_RAW: dict[str, int] = {
    **{k: v for k, v in EXPECTED_SEND.items() if v is not None},
    "05_sop_instance_uid_too_long.dcm": C000,
    "03_missing_sop_instance_uid.dcm": C000,
    "09_transfer_syntax_mismatch.dcm": C000,  # big endian declared, little endian bytes: garbage
    "11_sop_class_mismatch_meta_vs_dataset.dcm": A900,  # request says CT (meta), data set says MR
    "13_anonymizer_blanked_uids.dcm": C000,  # never stored under the meta's UIDs
}
# (12, the empty file, has no bytes to send: a C-STORE announcing a data set must carry one.)
NOT_PART10 = ["07_bad_dicm_prefix.dcm", "10_not_dicom.dcm"]

REFERENCE = TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE, MR_IMAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
LONG_UID = "1.2.826.0.1.3680043.2.1125." + "1234567890" * 5 + ".123"  # 81 characters
UID_65 = "1." + "2" * 63


def test_expectations_cover_every_malformed_file() -> None:
    assert sorted(p.name for p in MALFORMED.iterdir()) == sorted(EXPECTED_SEND)


def assert_nothing_stored(svc: Service, tmp_path: Path, files_before: set[Path]) -> None:
    """No row, no file of record, no temp file, and nothing new anywhere in tmp_path but db/log."""
    assert stored_instances(svc.database_url) == {}
    assert spool_objects(svc.spool) == {}
    assert spool_temp_files(svc.spool) == []
    new = all_files(tmp_path) - files_before
    unexpected = [
        p
        for p in new
        if p.parent != tmp_path / "logs" and not p.name.startswith(("test.db", "pacs-triage.db"))
    ]
    assert unexpected == [], f"unexpected files: {unexpected}"
    assert not any(p.name == "x" for p in all_files(tmp_path)), "a peer string became a file name"
    # Every refusal was a typed one: no handler failed unexpectedly, pynetdicom raised nothing.
    assert "Traceback" not in svc.log_text() and "failed unexpectedly" not in svc.log_text()


def test_each_malformed_file_sent_by_our_scu(service: Service, tmp_path: Path) -> None:
    before = all_files(tmp_path)
    for name, expected in EXPECTED_SEND.items():
        (result,) = send_files(service.peer, [MALFORMED / name], calling_ae="MALFORMED_SCU", timeout=20)
        assert result.status == expected, f"{name}: {result}"
        if expected is NOT_SENT:
            assert result.comment.startswith("not sent"), f"{name}: {result}"
        assert service.echo() == 0, f"service stopped answering after {name}"
    assert_nothing_stored(service, tmp_path, before)


def test_malformed_folder_with_the_cli(sqlite_services: ServiceFactory, tmp_path: Path) -> None:
    svc = sqlite_services()
    before = all_files(tmp_path)
    out = svc.cli("send", "--calling-ae", "MALFORMED_SCU", "--timeout", "20", svc.address, str(MALFORMED))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = {line.split()[2].rsplit("/", 1)[-1]: line.split()[:2] for line in out.stdout.splitlines()}
    assert set(lines) == set(EXPECTED_SEND), out.stdout
    for name, expected in EXPECTED_SEND.items():
        code = "------" if expected is None else f"0x{expected:04X}"
        assert lines[name] == ["FAILED", code], f"{name}: {lines[name]}"
    assert "0 sent, 13 failed" in out.stderr
    assert svc.echo() == 0
    assert_nothing_stored(svc, tmp_path, before)


def _raw_context(path: Path) -> tuple[str, str, str]:
    meta = read_quietly(path, stop_before_pixels=True).file_meta
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
    )


def test_each_malformed_file_in_the_raw_path_form(sqlite_services: ServiceFactory, tmp_path: Path) -> None:
    svc = sqlite_services()
    before = all_files(tmp_path)
    for name, expected in EXPECTED_RAW.items():
        path = MALFORMED / name
        sop_class, sop_instance, ts = _raw_context(path)
        assoc = associate(svc.port, [(sop_class, ts)], calling_ae="RAW_SCU")
        assert assoc.is_established, name
        try:
            rsp = raw_c_store(
                assoc,
                dataset_bytes(path),
                sop_class=sop_class,
                sop_instance=sop_instance,
                context=(sop_class, ts),
            )
            assert rsp.status == expected, f"{name}: {rsp}"
            assert rsp.comment, f"{name}: a refusal says why"
            assert echo_on(assoc) == 0, f"{name}: the association did not survive"
        finally:
            assoc.release()
    # Files that are not Part 10 at all: their bytes as a data set under a well-formed request.
    for name in NOT_PART10:
        assoc = associate(svc.port, [(CT_IMAGE, EXPLICIT_LE)], calling_ae="RAW_SCU")
        try:
            rsp = raw_c_store(
                assoc, (MALFORMED / name).read_bytes(), sop_class=CT_IMAGE, sop_instance="1.2.3.4.5.6.7"
            )
            assert rsp.status == C000, f"{name}: {rsp}"
        finally:
            assoc.release()
        assert svc.echo() == 0
    assert_nothing_stored(svc, tmp_path, before)


def test_pynetdicom_path_form_with_meta_class_differing_from_data_set(
    sqlite_services: ServiceFactory, tmp_path: Path
) -> None:
    """File 11 through pynetdicom's own chunked path form: request CT (meta), data set MR -> A900."""
    svc = sqlite_services()
    path = MALFORMED / "11_sop_class_mismatch_meta_vs_dataset.dcm"
    assoc = associate(svc.port, [(CT_IMAGE, EXPLICIT_LE)])
    try:
        with pynetdicom_config(STORE_SEND_CHUNKED_DATASET=True):
            rsp = assoc.send_c_store(path)
        assert rsp.Status == A900
        assert "differs from" in rsp.ErrorComment
    finally:
        assoc.release()
    assert stored_instances(svc.database_url) == {}
    assert svc.echo() == 0


def _reference() -> Dataset:
    return read_quietly(REFERENCE)


def _with(ds: Dataset, **values: str) -> bytes:
    changed = copy.deepcopy(ds)
    for keyword, value in values.items():
        setattr(changed, keyword, value)
    return encode_dataset(changed)


def _store(assoc: Association, data: bytes, sop_class: str, sop_instance: str) -> int | None:
    rsp = raw_c_store(
        assoc, data, sop_class=sop_class, sop_instance=sop_instance, context=(MR_IMAGE, EXPLICIT_LE)
    )
    assert echo_on(assoc) == 0, "the association must survive a refused C-STORE"
    return rsp.status


def test_request_and_data_set_disagree(sqlite_services: ServiceFactory) -> None:
    """PS3.4 B.2.3: the data set does not match the request's SOP Class/Instance -> A900, nothing stored."""
    svc = sqlite_services()
    ds = _reference()
    uid = str(ds.SOPInstanceUID)
    assoc = associate(svc.port, [(MR_IMAGE, EXPLICIT_LE), (CT_IMAGE, EXPLICIT_LE)])
    try:
        assert _store(assoc, encode_dataset(ds), MR_IMAGE, "1.2.3.4.5.6.7.8") == A900  # other instance
        assert _store(assoc, encode_dataset(ds), CT_IMAGE, uid) == A900  # request CT, data set MR
        assert _store(assoc, _with(ds, SOPClassUID=CT_IMAGE), MR_IMAGE, uid) == A900
        assert stored_instances(svc.database_url) == {}
        assert _store(assoc, encode_dataset(ds), MR_IMAGE, uid) == 0  # the same, matching: stored
    finally:
        assoc.release()
    assert set(stored_instances(svc.database_url)) == {uid}


# (request SOP Instance UID, or None for the reference's valid one; changes to the data set)
UID_ABUSE = {
    "request traversal": ("../../x", {}),
    "data set traversal": (None, {"SOPInstanceUID": "../../x"}),
    "both traversal": ("../../x", {"SOPInstanceUID": "../../x"}),
    "request absolute path": ("/etc/x", {}),
    "request empty": ("", {}),
    "data set empty": (None, {"SOPInstanceUID": ""}),
    "request 81 chars": (LONG_UID, {}),
    "data set 81 chars": (None, {"SOPInstanceUID": LONG_UID}),
    "both 81 chars": (LONG_UID, {"SOPInstanceUID": LONG_UID}),
    "request 65 chars": (UID_65, {}),
    "both 65 chars": (UID_65, {"SOPInstanceUID": UID_65}),
    "study traversal": (None, {"StudyInstanceUID": "../../x"}),
    "series 81 chars": (None, {"SeriesInstanceUID": LONG_UID}),
    "leading zero": ("1.02.3", {"SOPInstanceUID": "1.02.3"}),
}


def test_abusive_uids_are_refused_and_never_become_paths(
    sqlite_services: ServiceFactory, tmp_path: Path
) -> None:
    svc = sqlite_services()
    before = all_files(tmp_path)
    etc_x_existed = Path("/etc/x").exists()
    ds = _reference()
    assoc = associate(svc.port, [(MR_IMAGE, EXPLICIT_LE)], calling_ae="ABUSE_SCU")
    assert assoc.is_established
    try:
        # The request's SOP Class UID too: valid, a traversal, and over-long.
        for request_class in (MR_IMAGE, "../../x", LONG_UID):
            for case, (request_uid, changes) in UID_ABUSE.items():
                data = _with(ds, **changes)
                sop_instance = str(ds.SOPInstanceUID) if request_uid is None else request_uid
                status = _store(assoc, data, request_class, sop_instance)
                assert status == C000, f"{case} (class {request_class[:20]}): 0x{status or 0:04X}"
    finally:
        assoc.release()
    assert svc.echo() == 0
    assert_nothing_stored(svc, tmp_path, before)
    assert Path("/etc/x").exists() == etc_x_existed
