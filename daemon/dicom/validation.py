"""Decide whether a received data set can be stored, before anything touches the disk.

pydicom accepts a lot silently (truncated headers, blanked UIDs, class mismatches: see
shared/testdata/MANIFEST.md), so the receiver checks what it relies on itself.
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


def _check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """An image must carry pixel data consistent with its Image Pixel module (PS3.3 C.7.6.3)."""
    pixel_tag = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_tag is None:
        raise InvalidDataset("image has no Pixel Data (7FE0,0010): truncated or incomplete data set")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        data: bytes = ds[pixel_tag].value
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidDataset(f"Image Pixel module incomplete or invalid: {exc}") from exc
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32, 64) or frames <= 0:
        raise InvalidDataset(f"implausible image geometry Rows={rows} Columns={cols} BitsAllocated={bits}")
    if UID(transfer_syntax).is_compressed:
        try:
            fragments = sum(1 for _ in generate_fragments(data))
        except (ValueError, EOFError) as exc:
            raise InvalidDataset(f"encapsulated Pixel Data is malformed: {exc}") from exc
        if fragments == 0:
            raise InvalidDataset("encapsulated Pixel Data has no fragments")
        return
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if len(data) < expected:
        raise InvalidDataset(
            f"Pixel Data holds {len(data)} bytes; Rows x Columns x Samples x Frames x BitsAllocated "
            f"needs {expected} (truncated?)"
        )
