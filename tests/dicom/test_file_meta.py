"""daemon.dicom.file_meta writes the bytes pydicom writes for pynetdicom's ``event.file_meta``."""

from __future__ import annotations

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta

from daemon.dicom.file_meta import PREAMBLE, file_header


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
