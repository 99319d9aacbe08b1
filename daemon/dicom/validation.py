"""Decide whether a received data set can be stored, before anything touches the disk.

pydicom accepts a lot silently (truncated headers, blanked UIDs, class mismatches: see
shared/testdata/MANIFEST.md), so the receiver checks what it relies on itself, and only that:
each check below enforces a clause of the standard, and a valid instance of an accepted SOP
class passes them all (tests/dicom/test_validation_clauses.py: a valid and an invalid file each).

| check | clause | refusal |
|---|---|---|
| request's Affected SOP Class/Instance UID are UIDs | PS3.7 9.3.1.1, PS3.5 9.1 | C000 |
| encoding matches the accepted transfer syntax (encoding.py) | PS3.5 7.1, 7.5, A.4 | C000 |
| SOP Class/Instance UID present and UIDs | PS3.3 C.12.1 (Type 1), PS3.5 9.1 | C000 |
| ... and equal to the request's | PS3.4 B.2.3 (Table B.2-1) | A900 |
| Study/Series Instance UID present and UIDs | PS3.3 C.7.2.1, C.7.3.1 (Type 1), PS3.5 9.1 | C000 |
| recorded strings hold no NUL (trailing NUL padding is stripped) | PS3.5 6.2 | C000 |
| Series Number fits IS | PS3.5 6.2, Table 6.2-1 | C000 |
| images: the pixel data the Image Pixel module describes | PS3.3 C.7.6.3, PS3.5 8.1.1, A.4 | C000 |
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.tag import Tag
from pydicom.uid import UID

from daemon.dicom.errors import DatasetMismatch, InvalidDataset, InvalidValue
from storage.ingest import IncomingInstance
from vocabulary import is_valid_uid


def require_uid(value: object, what: str) -> str:
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidDataset(
            f"{what} {shown} is not a valid UID (PS3.5 9.1: digits and dots, 1-64 characters)"
        )
    return str(value)


_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1  # PS3.5 Table 6.2-1: IS is a 32-bit signed integer


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    """A string attribute we record; PS3.5 6.2: no NUL in character strings (UI alone pads with one)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    # Trailing NUL padding is a common writer bug that hides nothing: tolerated, and removed.
    text = str(value).rstrip("\0 ")
    if "\0" in text:
        raise InvalidValue(f"{_name(keyword)} has a NUL byte (PS3.5 6.2)")
    return text[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS attribute we record; PS3.5 Table 6.2-1: -2^31 .. 2^31-1 (unparseable: not recorded)."""
    value = ds.get(keyword)
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    if number is not None and not _IS_MIN <= number <= _IS_MAX:
        raise InvalidValue(f"{_name(keyword)} beyond IS range (PS3.5 6.2): {number}")
    return number


def _name(keyword: str) -> str:
    tag = Tag(keyword)
    return f"{keyword} ({tag.group:04X},{tag.element:04X})"


def check_request_uids(sop_class_uid: Any, sop_instance_uid: Any) -> tuple[str, str]:
    """The C-STORE request's Affected SOP Class/Instance UIDs (checked before anything else)."""
    return (
        require_uid(sop_class_uid, "Affected SOP Class UID"),
        require_uid(sop_instance_uid, "Affected SOP Instance UID"),
    )


def validate_received(
    ds: Dataset, *, request_sop_class: str, request_sop_instance: str, transfer_syntax: str, is_image: bool
) -> IncomingInstance:
    """Return the identifying attributes of ``ds`` or raise InvalidDataset / DatasetMismatch."""
    try:
        sop_class = ds.get("SOPClassUID")
        sop_instance = ds.get("SOPInstanceUID")
        study = ds.get("StudyInstanceUID")
        series = ds.get("SeriesInstanceUID")
    except Exception as exc:
        raise InvalidDataset(f"data set cannot be parsed: {exc}") from exc
    sop_class = require_uid(sop_class, "SOP Class UID (0008,0016)")
    sop_instance = require_uid(sop_instance, "SOP Instance UID (0008,0018)")
    if sop_class != request_sop_class:
        raise DatasetMismatch(
            f"data set SOP Class UID {sop_class} differs from the request's {request_sop_class}"
        )
    if sop_instance != request_sop_instance:
        raise DatasetMismatch(
            f"data set SOP Instance UID {sop_instance} differs from the request's {request_sop_instance}"
        )
    study = require_uid(study, "Study Instance UID (0020,000D)")
    series = require_uid(series, "Series Instance UID (0020,000E)")
    if is_image:
        _check_pixel_data(ds, transfer_syntax)
    return IncomingInstance(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax,
        patient_id=_text(ds, "PatientID", 64),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
        accession_number=_text(ds, "AccessionNumber", 16),
        modality=_text(ds, "Modality", 16),
        body_part_examined=_text(ds, "BodyPartExamined", 64),
        series_description=_text(ds, "SeriesDescription", 64),
        series_number=_int(ds, "SeriesNumber"),
    )


# PS3.3 C.7.6.3.1.2: 4:2:2 forms carry two Y and one CB and one CR sample per two pixels (2 per
# pixel); 4:2:0 (YBR_PARTIAL_420) 1.5 per pixel; every other form SamplesPerPixel per pixel.
_SUBSAMPLED = {"YBR_FULL_422": (2, 1), "YBR_PARTIAL_422": (2, 1), "YBR_PARTIAL_420": (3, 2)}


def _check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """An image must carry the pixel data its Image Pixel module describes.

    Checks, each with its clause: a pixel data element is present (PS3.3 C.7.6.3: Pixel Data, or
    Float / Double Float Pixel Data, Type 1C; the JPIP Referenced transfer syntaxes that send none
    are not accepted here, daemon/dicom/sop_classes.py); Rows, Columns (Type 1) and Number of
    Frames are positive; Bits Allocated is 1 or a multiple of 8 (PS3.5 8.1.1); encapsulated
    Pixel Data has at least one fragment (PS3.5 A.4); native Pixel Data is at least Rows x Columns
    x Frames x samples per pixel x Bits Allocated bits (PS3.5 8.1.1 / 8.2, with the subsampled
    YBR forms of PS3.3 C.7.6.3.1.2). More bytes than needed are not refused.
    """
    pixel_tag = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_tag is None:
        raise InvalidDataset("image without Pixel Data (7FE0,0010) (PS3.3 C.7.6.3): truncated?")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        data: bytes = ds[pixel_tag].value
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidDataset(f"Image Pixel module incomplete (PS3.3 C.7.6.3): {exc}") from exc
    if rows <= 0 or cols <= 0 or frames <= 0 or samples <= 0:
        raise InvalidDataset(
            f"Rows {rows} Columns {cols} Frames {frames} Samples {samples}: not positive (PS3.3 C.7.6.3)"
        )
    if bits != 1 and (bits <= 0 or bits % 8):
        raise InvalidDataset(f"Bits Allocated {bits} is not 1 or a multiple of 8 (PS3.5 8.1.1)")
    if UID(transfer_syntax).is_compressed and pixel_tag == "PixelData":
        try:  # the items: the Basic Offset Table (perhaps empty), then the fragments
            items = sum(1 for _ in generate_fragments(data))
        except (ValueError, EOFError) as exc:
            raise InvalidDataset(f"encapsulated Pixel Data malformed (PS3.5 A.4): {exc}") from exc
        if items < 2:
            raise InvalidDataset("encapsulated Pixel Data has no fragment (PS3.5 A.4)")
        return
    numerator, denominator = _SUBSAMPLED.get(photometric, (samples, 1))
    expected = (rows * cols * frames * numerator * bits // denominator + 7) // 8
    if len(data) < expected:
        raise InvalidDataset(
            f"Pixel Data {len(data)} bytes, needs {expected} (PS3.5 8.1.1): truncated? "
            f"{rows}x{cols}x{frames} frames, {photometric or '?'}, {bits} bits"
        )
