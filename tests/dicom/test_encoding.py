"""A data set must be encoded as its accepted presentation context says (issue 11 item 3).

Implicit VR bytes on an Explicit VR context (or the reverse), or bytes after the last element,
were stored and were unreadable later (pydicom reads on, switching VR mode by itself; the
stored file's meta declares the context's transfer syntax). Now refused with C000 before the
acknowledgement, nothing stored; the valid twin on the right context is stored byte for byte.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from daemon.dicom.encoding import check_encoding
from daemon.dicom.errors import EncodingMismatch
from tests.paths import TESTDATA
from tests.support.dicom_bytes import (
    associate,
    dataset_bytes,
    echo_on,
    encode_dataset,
    raw_c_store,
    read_quietly,
    transfer_syntax_of,
)
from tests.support.service import ServiceFactory
from tests.support.stored import spool_objects, stored_instances

REFERENCE = TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
C000 = 0xC000


def _reference() -> Dataset:
    return read_quietly(REFERENCE)


def _bad_encodings(ds: Dataset) -> dict[str, tuple[bytes, str]]:
    explicit, implicit = encode_dataset(ds), encode_dataset(ds, implicit_vr=True)
    return {
        "implicit VR on an explicit VR context": (implicit, EXPLICIT_LE),
        "explicit VR on an implicit VR context": (explicit, IMPLICIT_LE),
        "3 trailing bytes": (explicit + b"abc", EXPLICIT_LE),
        "a trailing element header without its value": (
            explicit + b"\xfc\xff\xfc\xffOB\0\0\x10\0\0\0",
            EXPLICIT_LE,
        ),
        "8 trailing garbage bytes": (explicit + b"\0\0\0\0\0\0\0\0", EXPLICIT_LE),
        "cut short in Pixel Data": (explicit[:-7], EXPLICIT_LE),
    }


def test_mismatched_encodings_are_refused_before_the_ack(sqlite_services: ServiceFactory) -> None:
    svc = sqlite_services()
    ds = _reference()
    uid = str(ds.SOPInstanceUID)
    assoc = associate(svc.port, [(MR_IMAGE, EXPLICIT_LE), (MR_IMAGE, IMPLICIT_LE)], calling_ae="ENCODING_SCU")
    assert assoc.is_established
    try:
        for case, (data, ts) in _bad_encodings(ds).items():
            rsp = raw_c_store(assoc, data, sop_class=MR_IMAGE, sop_instance=uid, context=(MR_IMAGE, ts))
            assert rsp.status == C000, f"{case}: {rsp}"
            assert rsp.comment.startswith("not "), f"{case}: {rsp.comment}"
            assert echo_on(assoc) == 0, case
        assert stored_instances(svc.database_url) == {}
        assert spool_objects(svc.spool) == {}
        # The same data set on the context that matches its encoding: stored, and readable as stored.
        for data, ts in (
            (encode_dataset(ds, implicit_vr=True), IMPLICIT_LE),
            (encode_dataset(ds), EXPLICIT_LE),
        ):
            rsp = raw_c_store(assoc, data, sop_class=MR_IMAGE, sop_instance=uid, context=(MR_IMAGE, ts))
            assert rsp.status == 0, rsp
            row = stored_instances(svc.database_url)[uid]
            stored = svc.spool / row.path
            assert dataset_bytes(stored) == data
            assert str(dcmread(stored).file_meta.TransferSyntaxUID) == ts
    finally:
        assoc.release()


VALID = sorted(p for p in TESTDATA.rglob("*.dcm") if "malformed" not in p.parts)


@pytest.mark.parametrize("path", VALID, ids=lambda p: str(p.relative_to(TESTDATA)))
def test_every_valid_test_file_passes_the_encoding_check(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_encoding(dataset_bytes(path), transfer_syntax_of(path))


def test_each_mismatch_is_named() -> None:
    for case, (data, ts) in _bad_encodings(_reference()).items():
        with pytest.raises(
            EncodingMismatch, match=r"^not (Explicit|Implicit) VR Little Endian at byte \d+: "
        ):
            check_encoding(data, ts)
        print(case)
