"""Every receiver check, with a valid and an invalid file, built with pydicom (issue 11 item 18).

Each check enforces a clause of the standard (the table in daemon/dicom/validation.py); a
valid instance of an accepted SOP class is never refused. The fault found: uncompressed
YBR_FULL_422 (PS3.3 C.7.6.3.1.2: two samples per pixel, not three) was refused with C000
as "truncated". The encoding checks have their pairs in tests/dicom/test_encoding.py, the
value checks (NUL, IS range) in tests/dicom/test_values.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space

from daemon.dicom.errors import DatasetMismatch, InvalidDataset, InvalidValue
from daemon.dicom.validation import check_request_uids, validate_received
from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate, encode_dataset, raw_c_store, read_quietly
from tests.support.service import ServiceFactory
from tests.support.stored import stored_instances

MR = TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"
RGB = TESTDATA / "transfer_syntaxes" / "sc_rgb_explicit_le_REF.dcm"
J2K = TESTDATA / "transfer_syntaxes" / "mr_small_j2k_lossless.dcm"
SEG = TESTDATA / "sr_examples" / "dcmqi_liver_seg" / "liver_seg.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def ybr_full_422(rgb_path: Path = RGB) -> Dataset:
    """A valid uncompressed YBR_FULL_422 Secondary Capture (Y1 Y2 Cb Cr per two pixels)."""
    ds = read_quietly(rgb_path)
    ybr = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL")
    pairs = ybr.reshape(ds.Rows, ds.Columns // 2, 2, 3)
    packed = np.stack(
        [
            pairs[:, :, 0, 0],
            pairs[:, :, 1, 0],
            pairs[:, :, :, 1].mean(axis=2),
            pairs[:, :, :, 2].mean(axis=2),
        ],
        axis=-1,
    ).astype(np.uint8)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.tobytes()
    return ds


def _changed(path: Path, change: Callable[[Dataset], None]) -> Dataset:
    ds = copy.deepcopy(read_quietly(path))
    change(ds)
    return ds


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return change


def _truncate(n: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData[:-n]

    return change


def _no_fragments(ds: Dataset) -> None:
    ds.PixelData = b"\xfe\xff\x00\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"  # empty offset table, delimiter


def _validate(ds: Dataset, ts: str = EXPLICIT_LE, *, request_class: str | None = None) -> None:
    validate_received(
        ds,
        request_sop_class=request_class or str(ds.get("SOPClassUID", SECONDARY_CAPTURE)),
        request_sop_instance=str(ds.get("SOPInstanceUID", "1.2.3.4")),
        transfer_syntax=ts,
        is_image=True,
    )


J2K_TS = "1.2.840.10008.1.2.4.90"


def _ybr_truncated(ds: Dataset) -> Dataset:
    ds.PixelData = ds.PixelData[:-2]
    return ds


# check -> (a valid data set, an invalid one, their transfer syntax, the error of the invalid one)
CASES: dict[str, tuple[Dataset, Dataset, str, type[Exception]]] = {
    "SOP Instance UID present (PS3.3 C.12.1)": (
        read_quietly(MR),
        _changed(MR, _set(SOPInstanceUID=None)),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "Study Instance UID a UID (PS3.3 C.7.2.1, PS3.5 9.1)": (
        read_quietly(MR),
        _changed(MR, _set(StudyInstanceUID="1.02.3")),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "Series Instance UID present (PS3.3 C.7.3.1)": (
        read_quietly(MR),
        _changed(MR, _set(SeriesInstanceUID=None)),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "recorded strings without NUL (PS3.5 6.2)": (
        _changed(MR, _set(PatientID="PADDED\0")),
        _changed(MR, _set(PatientID="A\0B")),
        EXPLICIT_LE,
        InvalidValue,
    ),
    "Series Number within IS (PS3.5 Table 6.2-1)": (
        _changed(MR, _set(SeriesNumber=str(2**31 - 1))),
        _changed(MR, _set(SeriesNumber=str(2**31))),
        EXPLICIT_LE,
        InvalidValue,
    ),
    "Pixel Data present (PS3.3 C.7.6.3)": (
        read_quietly(MR),
        _changed(MR, _set(PixelData=None)),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "Rows positive (PS3.3 C.7.6.3)": (
        read_quietly(MR),
        _changed(MR, _set(Rows=0)),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "Bits Allocated 1 or a multiple of 8 (PS3.5 8.1.1)": (
        read_quietly(SEG),  # 1 bit, 3 frames packed
        _changed(MR, _set(BitsAllocated=12)),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "monochrome Pixel Data long enough (PS3.5 8.1.1)": (
        read_quietly(MR),
        _changed(MR, _truncate(2)),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "RGB Pixel Data long enough (PS3.3 C.7.6.3.1.2)": (
        read_quietly(RGB),
        _changed(RGB, _truncate(2)),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "YBR_FULL_422 Pixel Data, 2 samples per pixel (PS3.3 C.7.6.3.1.2)": (
        ybr_full_422(),
        _ybr_truncated(ybr_full_422()),
        EXPLICIT_LE,
        InvalidDataset,
    ),
    "encapsulated Pixel Data has a fragment (PS3.5 A.4)": (
        read_quietly(J2K),
        _changed(J2K, _no_fragments),
        J2K_TS,
        InvalidDataset,
    ),
}


@pytest.mark.parametrize("check", CASES)
def test_each_check_accepts_the_valid_file_and_refuses_the_invalid_one(check: str) -> None:
    valid, invalid, ts, error = CASES[check]
    _validate(valid, ts)
    with pytest.raises(error) as refused:
        _validate(invalid, ts)
    assert "PS3." in str(refused.value) or "UID" in str(refused.value), str(refused.value)


def test_request_uids_are_uids_and_match_the_data_set() -> None:
    """PS3.7 9.3.1.1 / PS3.5 9.1: the request's UIDs; PS3.4 B.2.3: the data set must match them."""
    ds = read_quietly(MR)
    assert check_request_uids(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    with pytest.raises(InvalidDataset):
        check_request_uids(str(ds.SOPClassUID), "1.02.3")
    _validate(ds)
    with pytest.raises(DatasetMismatch):
        _validate(ds, request_class=SECONDARY_CAPTURE)


def test_every_real_image_in_testdata_passes(tmp_path: Path) -> None:
    """No valid instance of an accepted SOP class is refused: all the real files of shared/testdata."""
    from daemon.dicom import sop_classes

    checked = 0
    for path in sorted(TESTDATA.rglob("*.dcm")):
        if "malformed" in path.parts:
            continue
        ds = read_quietly(path)
        if str(ds.get("SOPClassUID")) not in sop_classes.ACCEPTED_STORAGE:  # (charset samples: none)
            continue
        validate_received(
            ds,
            request_sop_class=str(ds.SOPClassUID),
            request_sop_instance=str(ds.SOPInstanceUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            is_image=sop_classes.is_image(str(ds.SOPClassUID)),
        )
        checked += 1
    assert checked > 100


def test_ybr_full_422_is_stored_by_the_receiver(sqlite_services: ServiceFactory) -> None:
    """Through a real association: the valid YBR_FULL_422 stored, a truncated one refused (C000)."""
    svc = sqlite_services()
    valid, truncated = ybr_full_422(), _ybr_truncated(ybr_full_422())
    truncated.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.422.2"
    assoc = associate(svc.port, [(SECONDARY_CAPTURE, EXPLICIT_LE)], calling_ae="YBR_SCU")
    assert assoc.is_established
    try:
        for ds, expected in ((valid, 0x0000), (truncated, 0xC000)):
            rsp = raw_c_store(
                assoc, encode_dataset(ds), sop_class=SECONDARY_CAPTURE, sop_instance=str(ds.SOPInstanceUID)
            )
            assert rsp.status == expected, rsp
    finally:
        assoc.release()
    assert set(stored_instances(svc.database_url)) == {str(valid.SOPInstanceUID)}
