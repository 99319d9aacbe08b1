"""daemon.dicom.file_meta writes the bytes pydicom writes for pynetdicom's ``event.file_meta``."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta

from daemon.dicom.file_meta import PREAMBLE, file_header
from storage.receipt import (
    RECEIPT_CREATOR,
    AssociationInfo,
    Content,
    Delivery,
    Receipt,
    digest,
    read_content,
    seal,
)
from tests.support.dicom_bytes import dataset_bytes
from tests.support.instances import ct_chunks, ct_dataset
from tests.support.peers import need_tool


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1"),  # odd lengths: NULL padding
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.34", "1.2.840.10008.1.2"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.7", "9" * 64, "1.2.840.10008.1.2.4.90"),  # the longest UID
        ("1.2.840.10008.5.1.4.1.1.2.1", "2.25.1", "1.2.840.10008.1.2.1.99"),  # deflated
    ],
)
def test_same_bytes_as_pydicom(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(transfer_syntax)
    )
    expected = DicomBytesIO()
    expected.write(PREAMBLE)
    write_file_meta_info(expected, meta, enforce_standard=True)
    assert file_header(sop_class, sop_instance, transfer_syntax) == expected.getvalue()


def test_the_receipt_rides_in_the_meta_group_and_leaves_the_data_set_alone(tmp_path: Path) -> None:
    """storage.receipt seals what file_header + a data set make (issue 15: the rows' facts in the file).

    pydicom reads the standard elements and the private information back; the data set bytes
    are untouched; dciodvfy reports nothing it does not report without the receipt; stripping
    the receipt gives back the exact bytes the hash was taken of, and a torn or altered file is
    not taken for a complete one.
    """
    ds = ct_dataset("1.2.3.4.5", "1.2.3.4", "1.2.3", fill=9)
    header, data = ct_chunks(ds)
    association = AssociationInfo(
        "d" * 36, "MODALITY 1", "PACS_TRIAGE", "192.0.2.1", dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
    )
    delivery = Delivery(association, dt.datetime(2026, 12, 3, 8, 30, 1, 5, tzinfo=dt.UTC))
    sha, size = digest((header, data))
    sealed = b"".join(seal((header, data), Receipt(delivery, sha, size)))
    assert sealed.endswith(data) and sealed[:132] == header[:132]
    path = tmp_path / "sealed.dcm"
    path.write_bytes(sealed)

    meta = dcmread(path).file_meta
    assert (meta.SendingApplicationEntityTitle, meta.ReceivingApplicationEntityTitle) == (
        "MODALITY 1",
        "PACS_TRIAGE",
    )
    assert meta.PrivateInformationCreatorUID == RECEIPT_CREATOR
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert dataset_bytes(path) == data
    content = read_content(sealed)
    assert content is not None and (content.sha256, content.size_bytes) == (sha, size) == digest(
        (header + data,)
    )
    assert content.receipt == Receipt(delivery, sha, size)
    assert read_content(header + data) == Content("1.2.3.4.5", sha, size, None)
    assert read_content(sealed[:-1]) is None
    flipped = bytearray(sealed)
    flipped[-3] ^= 0xFF
    assert read_content(bytes(flipped)) is None

    dciodvfy = need_tool("dciodvfy")
    plain = tmp_path / "plain.dcm"
    plain.write_bytes(header + data)
    reports = [
        sorted(
            line
            for line in subprocess.run([dciodvfy, str(p)], capture_output=True, text=True).stderr.splitlines()
            if line.startswith(("Error", "Warning"))
        )
        for p in (plain, path)
    ]
    assert reports[0] and reports[0] == reports[1]  # (the minimal test image lacks many attributes)
