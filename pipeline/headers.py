"""Reading DICOM headers: the values geometry and series selection need, without the pixels.

Headers are read with ``stop_before_pixels=True`` into small frozen value objects
(:class:`InstanceHeader`, one :class:`FrameHeader` per frame), so no data set with pixels is held.
Pixels are decoded by :mod:`pipeline.decode`; what is geometry lives in :mod:`pipeline.geometry`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.errors import GeometryError
from vocabulary import is_valid_uid

__all__ = ["FrameHeader", "InstanceHeader", "read_header"]


@dataclass(frozen=True)
class FrameHeader:
    """Geometry and value-transform attributes of one frame; ``None`` where the file lacks them."""

    frame_number: int | None  # 1-based frame of a multi-frame instance; None for a single-frame one
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm LPS
    orientation: tuple[float, float, float, float, float, float] | None  # ImageOrientationPatient
    pixel_spacing: tuple[float, float] | None  # PixelSpacing: (row spacing, column spacing), mm
    slice_thickness: float | None
    spacing_between_slices: float | None
    rescale: tuple[float, float]  # (RescaleSlope, RescaleIntercept); (1, 0) when absent


@dataclass(frozen=True)
class InstanceHeader:
    """The header of one SOP instance, as far as selection and geometry need it."""

    path: Path
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    meta_sop_class_uid: str  # MediaStorageSOPClassUID of the file meta ('' when absent)
    meta_sop_instance_uid: str  # MediaStorageSOPInstanceUID of the file meta ('' when absent)
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    series_number: int | None
    series_description: str
    # Sequence attributes for selection rules: SequenceName (0018,0024), or PulseSequenceName (0018,9005)
    # of enhanced MR; ContrastBolusAgent (0018,0010). '' when absent.
    sequence_name: str
    contrast_agent: str
    instance_number: int | None  # a label for messages only: never used to order slices
    image_type: tuple[str, ...]
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    number_of_frames: int
    has_functional_groups: bool  # PerFrameFunctionalGroupsSequence present (enhanced multi-frame)
    has_modality_lut: bool  # ModalityLUTSequence present (a non-linear modality LUT)
    gantry_detector_tilt: float | None
    frames: tuple[FrameHeader, ...]  # one per frame; empty for a multi-frame without functional groups

    @property
    def name(self) -> str:
        """How messages name this instance: its SOP Instance UID, or its file when that is unusable."""
        if is_valid_uid(self.sop_instance_uid):
            return f"instance {self.sop_instance_uid}"
        return f"file {self.path.name}"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a DS/FD value (single or multi-valued), or None when absent/invalid."""
    if value is None:
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(items) != n:
        return None
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return out if all(np.isfinite(out)) else None


def _float(value: Any) -> float | None:
    got = _floats(value, 1)
    return None if got is None else got[0]


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _rescale(item: Dataset | None, where: str, path: Path) -> tuple[float, float]:
    """(slope, intercept) of a Modality LUT module or Pixel Value Transformation item (PS3.3 C.11.1)."""
    if item is None or ("RescaleSlope" not in item and "RescaleIntercept" not in item):
        return (1.0, 0.0)
    slope, intercept = _float(item.get("RescaleSlope", 1.0)), _float(item.get("RescaleIntercept", 0.0))
    if slope is None or intercept is None or slope == 0.0:
        raise GeometryError(
            f"{path.name}: invalid RescaleSlope/RescaleIntercept {item.get('RescaleSlope')!r}/"
            f"{item.get('RescaleIntercept')!r} in {where}; cannot map stored values to output units"
        )
    return (slope, intercept)


def _frame_from(
    holder: Dataset | None,
    *,
    frame_number: int | None,
    rescale_item: Dataset | None,
    where: str,
    path: Path,
) -> FrameHeader:
    """Read the plane attributes from ``holder`` (the data set itself, or a merged functional group)."""
    get = (lambda k: None) if holder is None else holder.get
    pos = _floats(get("ImagePositionPatient"), 3)
    iop = _floats(get("ImageOrientationPatient"), 6)
    ps = _floats(get("PixelSpacing"), 2)
    return FrameHeader(
        frame_number=frame_number,
        position=None if pos is None else (pos[0], pos[1], pos[2]),
        orientation=None if iop is None else (iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]),
        pixel_spacing=None if ps is None else (ps[0], ps[1]),
        slice_thickness=_float(get("SliceThickness")),
        spacing_between_slices=_float(get("SpacingBetweenSlices")),
        rescale=_rescale(rescale_item, where, path),
    )


def _functional_group(item: Dataset, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The one item of a functional group macro: per-frame if present, else shared (PS3.3 C.7.6.16)."""
    for container in (item, shared):
        if container is not None and keyword in container and len(container[keyword].value) > 0:
            group: Dataset = container[keyword].value[0]
            return group
    return None


def _enhanced_frames(ds: Dataset, path: Path, number_of_frames: int) -> tuple[FrameHeader, ...]:
    """Per-frame geometry of an enhanced multi-frame image (PS3.3 C.7.6.16, C.7.6.16.2.*)."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != number_of_frames:
        raise GeometryError(
            f"{path.name}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items but "
            f"NumberOfFrames is {number_of_frames} (PS3.3 C.7.6.16 requires one item per frame)"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    frames = []
    for index, item in enumerate(per_frame):
        merged = Dataset()
        for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence", "PlanePositionSequence"):
            group = _functional_group(item, shared, keyword)
            if group is not None:
                merged.update(group)
        frames.append(
            _frame_from(
                merged,
                frame_number=index + 1,
                rescale_item=_functional_group(item, shared, "PixelValueTransformationSequence"),
                where=f"frame {index + 1} PixelValueTransformationSequence",
                path=path,
            )
        )
    return tuple(frames)


def read_header(path: str | os.PathLike[str]) -> InstanceHeader:
    """Read one file's header (never its pixels); raise GeometryError when it is not readable DICOM."""
    p = Path(path)
    try:
        ds = dcmread(p, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise GeometryError(f"{p.name}: not a DICOM file ({exc})") from exc
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise GeometryError(f"{p.name}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    meta = getattr(ds, "file_meta", Dataset())
    number_of_frames = _int(ds.get("NumberOfFrames")) or 1
    has_groups = "PerFrameFunctionalGroupsSequence" in ds
    if has_groups:
        frames = _enhanced_frames(ds, p, number_of_frames)
    elif number_of_frames == 1:
        frames = (_frame_from(ds, frame_number=None, rescale_item=ds, where="the data set", path=p),)
    else:
        frames = ()  # positions of the frames are unknown: geometry refuses it, selection skips it
    image_type = ds.get("ImageType")
    if isinstance(image_type, str):
        image_type = [image_type]
    return InstanceHeader(
        path=p,
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        meta_sop_class_uid=_text(meta, "MediaStorageSOPClassUID"),
        meta_sop_instance_uid=_text(meta, "MediaStorageSOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        modality=_text(ds, "Modality").upper(),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_text(ds, "SeriesDescription"),
        sequence_name=_text(ds, "SequenceName") or _text(ds, "PulseSequenceName"),
        contrast_agent=_text(ds, "ContrastBolusAgent"),
        instance_number=_int(ds.get("InstanceNumber")),
        image_type=tuple(str(v).strip().upper() for v in (image_type or ())),
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        samples_per_pixel=_int(ds.get("SamplesPerPixel")),
        number_of_frames=number_of_frames,
        has_functional_groups=has_groups,
        has_modality_lut="ModalityLUTSequence" in ds,
        gantry_detector_tilt=_float(ds.get("GantryDetectorTilt")),
        frames=frames,
    )
