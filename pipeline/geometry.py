"""Series -> Volume, with geometry that is either trustworthy or refused.

The rules, from the DICOM patient coordinate system (PS3.3 C.7.6.2.1.1):

- A pixel (column c, row r) of a slice lies at ``IPP + c * PixelSpacing[1] * rowcos + r *
  PixelSpacing[0] * colcos``: PixelSpacing is [row spacing, column spacing] (PS3.3 10.7.1.3), so
  non-square pixels map correctly.
- Slices are ordered by the projection of ImagePositionPatient onto the slice normal
  ``rowcos x colcos``, ascending (never by InstanceNumber, which is only a label, PS3.3 C.7.6.1.1).
- Enhanced multi-frame images take the same attributes from their functional groups
  (PS3.3 C.7.6.16.2.1 Pixel Measures, .2.3 Plane Position, .2.4 Plane Orientation,
  .2.9 Pixel Value Transformation), frame by frame.
- Every slice must share one orientation, size, pixel spacing and Frame of Reference
  (PS3.3 C.7.4.1.1.1; a Frame of Reference UID absent from every slice is taken as one frame,
  with a warning on the Volume, absent from some is refused); the slice positions must be evenly spaced. Gaps, variable spacing,
  duplicate positions (several phases, echoes or acquisitions in one series), missing attributes
  and mosaics are refused with a GeometryError that names the series and the values.

Gantry tilt. A tilted CT acquisition keeps axial-looking slices whose origins step along the
table axis, not along the slice normal: the stack is sheared. We keep it, exactly: the affine's
``k`` column is the actual inter-slice step vector (not ``normal * spacing``), so
``affine @ (i, j, k, 1)`` reproduces every slice's ImagePositionPatient and direction cosines
without resampling. :func:`shear_angle_deg` tells a consumer how far from orthogonal the affine is.
Shears beyond ``MAX_SHEAR_DEG`` (more than any gantry tilts) are refused as not a tilt at all.
GantryDetectorTilt is only quoted in messages: the positions and orientations are what place the
pixels. Variable spacing (as in a tilted head CT whose thickness changes mid-series) is refused,
never resampled.

Output: ``Volume.array`` float32 ``[i, j, k]``, C-contiguous, RescaleSlope/Intercept applied (Hounsfield units for CT, PS3.3 C.11.1.1.2); MONOCHROME1
is not inverted (it is a display rule, PS3.3 C.7.6.3.1.2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.decode import FrameJob, decode_into
from pipeline.errors import GeometryError
from pipeline.headers import FrameHeader, InstanceHeader, read_header
from pipeline.uids import derive_uid
from pipeline.volume import InstanceRef, Volume
from vocabulary import is_valid_uid

IOP_TOL = 1e-3  # |rowcos|, |colcos| within 1 +- IOP_TOL and |rowcos . colcos| <= IOP_TOL
ORIENTATION_TOL = 1e-3  # max difference of any direction cosine between slices of one volume
SPACING_TOL_MM = 0.01  # slice steps may differ by max(SPACING_TOL_MM, SPACING_TOL_REL * spacing)
SPACING_TOL_REL = 0.01
PIXEL_SPACING_TOL_MM = 1e-3  # PixelSpacing may differ this much between slices of one volume
DUPLICATE_TOL_MM = 0.01  # two slices closer than this along the normal occupy the same position
# An in-plane drift this small over the whole stack is rounding noise: k column = normal * spacing.
SNAP_TOL_MM = 1e-3
SHEAR_REPORT_DEG = 0.1  # shears from this angle up are mentioned in spacing errors
MAX_SHEAR_DEG = 30.0  # CT gantries tilt at most about +-30 degrees


@dataclass(frozen=True)
class _Slice:
    header: InstanceHeader
    frame: FrameHeader
    position: np.ndarray  # (3,) ImagePositionPatient
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (row, column)

    @property
    def name(self) -> str:
        n = self.frame.frame_number
        return self.header.name if n is None else f"{self.header.name} frame {n}"

    @property
    def label(self) -> str:
        """Short name for lists: InstanceNumber (a label only) or frame number, else the full name."""
        if self.frame.frame_number is not None:
            return f"frame {self.frame.frame_number}"
        n = self.header.instance_number
        return self.name if n is None else f"InstanceNumber {n}"


def slice_normal(iop: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit slice normal ``rowcos x colcos`` of an ImageOrientationPatient (PS3.3 C.7.6.2.1.1)."""
    v = np.asarray(iop, dtype=float)
    n = np.cross(v[:3], v[3:6])
    norm = float(np.linalg.norm(n))
    if norm == 0.0:
        raise ValueError(f"ImageOrientationPatient {list(iop)} has parallel row and column cosines")
    return n / norm


def shear_angle_deg(affine: np.ndarray) -> float:
    """Angle in degrees between the affine's k column and the normal of its i, j columns (0 = orthogonal)."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    n = np.cross(a[:, 0], a[:, 1])
    n /= np.linalg.norm(n)
    k = a[:, 2]
    cos = abs(float(k @ n)) / float(np.linalg.norm(k))
    return math.degrees(math.acos(min(1.0, cos)))


def _fmt(values: Iterable[float], digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def _check_instances(headers: Sequence[InstanceHeader]) -> str:
    """Identity checks on the instances; returns the series UID they all share."""
    series = {h.series_instance_uid for h in headers}
    label = next(iter(series)) if len(series) == 1 else "(mixed)"
    label = label or "(no SeriesInstanceUID)"
    if len(series) > 1:
        raise GeometryError(f"files of {len(series)} series given as one volume: {sorted(series)}")
    seen: dict[str, Path] = {}
    for h in headers:
        for keyword, value in (
            ("SOPClassUID", h.sop_class_uid),
            ("SOPInstanceUID", h.sop_instance_uid),
            ("SeriesInstanceUID", h.series_instance_uid),
            ("StudyInstanceUID", h.study_instance_uid),
        ):
            if not is_valid_uid(value):
                raise GeometryError(
                    f"series {label}: {h.name}: {keyword} {value!r} is missing or not a valid UID (PS3.5 9.1)"
                )
        # Absent from every slice (anonymisers strip it) is one frame, with a warning (load_volume);
        # absent from some slices is "mixed" below; present but not a UID is refused here.
        if h.frame_of_reference_uid and not is_valid_uid(h.frame_of_reference_uid):
            raise GeometryError(
                f"series {label}: {h.name}: FrameOfReferenceUID {h.frame_of_reference_uid!r} is missing or "
                "invalid; positions without a Frame of Reference cannot be placed (PS3.3 C.7.4.1)"
            )
        for keyword, meta, value in (
            ("SOPClassUID", h.meta_sop_class_uid, h.sop_class_uid),
            ("SOPInstanceUID", h.meta_sop_instance_uid, h.sop_instance_uid),
        ):
            if meta and meta != value:
                raise GeometryError(
                    f"series {label}: {h.path.name}: file meta MediaStorage{keyword} {meta!r} differs from "
                    f"the data set's {keyword} {value!r} (PS3.10 7.1)"
                )
        if h.sop_instance_uid in seen:
            raise GeometryError(
                f"series {label}: SOP instance {h.sop_instance_uid} appears twice "
                f"({seen[h.sop_instance_uid].name} and {h.path.name})"
            )
        seen[h.sop_instance_uid] = h.path
    for attr, keyword in (
        ("study_instance_uid", "StudyInstanceUID"),
        ("frame_of_reference_uid", "FrameOfReferenceUID"),
        ("modality", "Modality"),
    ):
        values = sorted({getattr(h, attr) or "(absent)" for h in headers})
        if len(values) > 1:
            raise GeometryError(f"series {label}: mixed {keyword} within the series: {values}")
    return label


def _check_pixels(h: InstanceHeader, series: str) -> None:
    if h.samples_per_pixel != 1:
        raise GeometryError(
            f"series {series}: {h.name}: SamplesPerPixel is {h.samples_per_pixel}; a volume needs "
            "monochrome images (SamplesPerPixel 1, PS3.3 C.8.2.1.1.3)"
        )
    if "MOSAIC" in h.image_type:
        image_type = "\\".join(h.image_type)
        raise GeometryError(
            f"series {series}: {h.name}: Siemens MOSAIC image (ImageType {image_type}); one "
            "file tiles many slices whose positions are only in private tags, unsupported"
        )
    if h.has_modality_lut:
        raise GeometryError(
            f"series {series}: {h.name}: non-linear Modality LUT Sequence (PS3.3 C.11.1) is unsupported; "
            "only RescaleSlope/RescaleIntercept are applied"
        )
    if not h.frames:
        raise GeometryError(
            f"series {series}: {h.name}: {h.number_of_frames} frames but no "
            "PerFrameFunctionalGroupsSequence, so the frames' positions are unknown (PS3.3 C.7.6.16)"
        )
    if not h.rows or not h.columns:
        raise GeometryError(f"series {series}: {h.name}: Rows/Columns missing (PS3.3 C.7.6.3)")


def _slices(headers: Sequence[InstanceHeader], series: str) -> list[_Slice]:
    out = []
    for h in headers:
        _check_pixels(h, series)
        for f in h.frames:
            where = h.name if f.frame_number is None else f"{h.name} frame {f.frame_number}"
            for attr, keyword in (
                ("position", "ImagePositionPatient"),
                ("orientation", "ImageOrientationPatient"),
                ("pixel_spacing", "PixelSpacing"),
            ):
                if getattr(f, attr) is None:
                    raise GeometryError(
                        f"series {series}: {where}: {keyword} missing or malformed; refusing to guess "
                        "the geometry (PS3.3 C.7.6.2, C.7.6.16.2)"
                    )
            assert f.position is not None and f.orientation is not None and f.pixel_spacing is not None
            if min(f.pixel_spacing) <= 0:
                raise GeometryError(f"series {series}: {where}: PixelSpacing {list(f.pixel_spacing)} not > 0")
            iop = np.asarray(f.orientation, dtype=float)
            row, col = iop[:3], iop[3:]
            if (
                abs(np.linalg.norm(row) - 1) > IOP_TOL
                or abs(np.linalg.norm(col) - 1) > IOP_TOL
                or abs(float(row @ col)) > IOP_TOL
            ):
                raise GeometryError(
                    f"series {series}: {where}: ImageOrientationPatient {_fmt(iop)} is not two orthogonal "
                    f"unit vectors (tolerance {IOP_TOL}, PS3.3 C.7.6.2.1.1)"
                )
            out.append(_Slice(h, f, np.asarray(f.position, dtype=float), iop, f.pixel_spacing))
    return out


def _check_uniform(slices: Sequence[_Slice], series: str) -> None:
    """One orientation, one size, one pixel spacing for the whole stack."""
    ref = slices[0]
    for s in slices[1:]:
        if float(np.max(np.abs(s.orientation - ref.orientation))) > ORIENTATION_TOL:
            distinct = sorted({_fmt(x.orientation) for x in slices})
            raise GeometryError(
                f"series {series}: mixed orientations (ImageOrientationPatient differs by more than "
                f"{ORIENTATION_TOL}): {', '.join(distinct[:5])}; a volume needs one orientation"
            )
        if (s.header.rows, s.header.columns) != (ref.header.rows, ref.header.columns):
            sizes = sorted({f"{x.header.rows}x{x.header.columns}" for x in slices})
            raise GeometryError(f"series {series}: mixed image sizes Rows x Columns {sizes}")
        if (
            max(abs(a - b) for a, b in zip(s.pixel_spacing, ref.pixel_spacing, strict=True))
            > PIXEL_SPACING_TOL_MM
        ):
            spacings = sorted({_fmt(x.pixel_spacing) for x in slices})
            raise GeometryError(f"series {series}: mixed PixelSpacing (row, column) {spacings}")


def _spacing_error(
    slices: Sequence[_Slice], d: np.ndarray, steps: np.ndarray, tol: float, series: str
) -> GeometryError:
    """Describe non-uniform steps along the normal: runs of equal steps, gaps, variable spacing."""
    expected = float(np.median(steps))
    runs: list[tuple[int, int, float]] = []  # (first slice, last slice, step)
    for k, step in enumerate(steps):
        if runs and abs(step - runs[-1][2]) <= tol:
            first, _, value = runs[-1]
            runs[-1] = (first, k + 1, value)
        else:
            runs.append((k, k + 1, float(step)))
    described = "; ".join(
        f"{b - a} step(s) of {v:.3f} mm ({slices[a].label} .. {slices[b].label})" for a, b, v in runs[:6]
    )
    gaps = []
    for k, step in enumerate(steps):
        m = round(step / expected)
        if m >= 2 and abs(step - m * expected) <= tol * m:
            gaps.append(f"{m - 1} missing slice(s) between {slices[k].label} and {slices[k + 1].label}")
    kind = "gap in the slice positions: " + "; ".join(gaps[:5]) if gaps else "variable slice spacing"
    first_step = slices[1].position - slices[0].position
    shear = math.degrees(math.acos(min(1.0, float(steps[0]) / float(np.linalg.norm(first_step)))))
    tilt = slices[0].header.gantry_detector_tilt
    tilt_note = f" The stack is also sheared by {shear:.1f} deg" if shear >= SHEAR_REPORT_DEG else ""
    tilt_note += f" (GantryDetectorTilt {tilt:g} deg)." if tilt else ("." if tilt_note else "")
    return GeometryError(
        f"series {series}: {kind}. Positions along the slice normal run {d[0]:.3f} .. {d[-1]:.3f} mm "
        f"in {len(d)} slices with {described}; a volume needs one spacing (tolerance {tol:.3f} mm) "
        f"and this service does not resample.{tilt_note}"
    )


def _duplicates_error(slices: Sequence[_Slice], d: np.ndarray, series: str) -> GeometryError:
    groups: list[list[int]] = [[0]]
    for k in range(1, len(d)):
        if d[k] - d[groups[-1][-1]] < DUPLICATE_TOL_MM:
            groups[-1].append(k)
        else:
            groups.append([k])
    dup = [g for g in groups if len(g) > 1]
    example = dup[0]
    return GeometryError(
        f"series {series}: duplicate slice positions: {len(slices)} images at {len(groups)} distinct "
        f"positions along the slice normal ({len(dup)} positions hold more than one image, e.g. "
        f"{len(example)} at {d[example[0]]:.3f} mm: {', '.join(slices[k].name for k in example[:4])}). "
        "Several phases, echoes, time points or acquisitions in one series cannot form one volume; "
        "they must be split into separate series."
    )


def _slice_step(slices: Sequence[_Slice], normal: np.ndarray, series: str) -> np.ndarray:
    """The affine's k column: the inter-slice step vector, checked to be constant."""
    if len(slices) == 1:
        f = slices[0].frame
        thickness = f.slice_thickness or f.spacing_between_slices
        if not thickness or thickness <= 0:
            raise GeometryError(
                f"series {series}: single slice without SliceThickness or SpacingBetweenSlices; "
                "its extent along the normal is unknown"
            )
        return normal * thickness
    positions = np.stack([s.position for s in slices])
    d = positions @ normal
    steps = np.diff(d)
    if float(np.min(steps)) < DUPLICATE_TOL_MM:
        raise _duplicates_error(slices, d, series)
    spacing = float(np.median(steps))
    tol = max(SPACING_TOL_MM, SPACING_TOL_REL * spacing)
    if float(np.max(np.abs(steps - spacing))) > tol:
        raise _spacing_error(slices, d, steps, tol, series)
    step_vectors = np.diff(positions, axis=0)
    in_plane = step_vectors - np.outer(steps, normal)
    drift = float(np.max(np.linalg.norm(in_plane - in_plane.mean(axis=0), axis=1)))
    if drift > tol:
        raise GeometryError(
            f"series {series}: slice origins shift in-plane by varying amounts from slice to slice "
            f"(up to {drift:.3f} mm beyond the mean shift, tolerance {tol:.3f} mm); not one rigid or "
            "sheared stack"
        )
    mean_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    along = float(mean_step @ normal)
    shear = math.degrees(math.atan2(float(np.linalg.norm(mean_step - along * normal)), along))
    if shear > MAX_SHEAR_DEG:
        raise GeometryError(
            f"series {series}: slices are sheared by {shear:.1f} deg (step {_fmt(mean_step, 3)} mm vs "
            f"normal {_fmt(normal)}), more than a gantry tilts ({MAX_SHEAR_DEG:g} deg)"
        )
    in_plane_total = float(np.linalg.norm(mean_step - along * normal)) * (len(slices) - 1)
    return normal * along if in_plane_total <= SNAP_TOL_MM else mean_step


def geometry_of(
    headers: Sequence[InstanceHeader],
) -> tuple[np.ndarray, list[tuple[InstanceHeader, FrameHeader]]]:
    """Check the headers of one series and return (affine, frames in volume order); no pixels read."""
    if not headers:
        raise GeometryError("no files given: a volume needs at least one image")
    # A canonical order first, so that neither the result nor the first error reported depends on
    # the order the files came in.
    ordered = sorted(headers, key=lambda h: (h.sop_instance_uid, str(h.path)))
    series = _check_instances(ordered)
    slices = _slices(ordered, series)
    _check_uniform(slices, series)
    normal = slice_normal(slices[0].orientation)
    slices.sort(key=lambda s: float(s.position @ normal))
    k_column = _slice_step(slices, normal, series)
    first = slices[0]
    row_spacing, column_spacing = first.pixel_spacing
    affine = np.eye(4)
    row_cosines, column_cosines = first.orientation[:3], first.orientation[3:]
    # i moves along a row: column spacing; j moves down a column: row spacing (PS3.3 10.7.1.3).
    affine[:3, 0] = row_cosines / np.linalg.norm(row_cosines) * column_spacing
    affine[:3, 1] = column_cosines / np.linalg.norm(column_cosines) * row_spacing
    affine[:3, 2] = k_column
    affine[:3, 3] = first.position
    # The guarantee: the affine puts every slice's origin where its header says it is.
    predicted = affine[:3, 3] + np.outer(np.arange(len(slices)), k_column)
    residual = float(np.max(np.linalg.norm(predicted - np.stack([s.position for s in slices]), axis=1)))
    limit = max(SPACING_TOL_MM, SPACING_TOL_REL * float(np.linalg.norm(k_column))) * 2
    if residual > limit:
        raise GeometryError(
            f"series {series}: the slice positions deviate by up to {residual:.3f} mm from an evenly "
            f"spaced stack (tolerance {limit:.3f} mm)"
        )
    return affine, [(s.header, s.frame) for s in slices]


def load_volume(paths: Iterable[str | os.PathLike[str]], *, workers: int | None = None) -> Volume:
    """Build the Volume of one series: headers checked, slices sorted along the normal, pixels rescaled.

    Raises GeometryError (a PermanentError) naming the series UID and the values when the geometry
    cannot be trusted. ``workers`` threads decode (default: one per core).
    """
    headers = [read_header(p) for p in paths]
    affine, frames = geometry_of(headers)
    first = frames[0][0]
    assert first.rows is not None and first.columns is not None
    # C order, so the array feeds torch/MONAI without a copy; decode.py writes it in slice blocks.
    array = np.empty((first.columns, first.rows, len(frames)), dtype=np.float32)
    jobs = [
        FrameJob(
            path=h.path,
            transfer_syntax_uid=h.transfer_syntax_uid,
            frame_index=None if f.frame_number is None else f.frame_number - 1,
            k=k,
            slope=f.rescale[0],
            intercept=f.rescale[1],
            instance_name=h.name,
        )
        for k, (h, f) in enumerate(frames)
    ]
    decode_into(array, jobs, series_uid=first.series_instance_uid, workers=workers)
    frame_of_reference = first.frame_of_reference_uid
    warnings: tuple[str, ...] = ()
    if not frame_of_reference:
        # PS3.3 C.7.4.1: positions are only comparable within one Frame of Reference. One series
        # from one acquisition shares one; with the UID stripped from every slice, the series is
        # taken as one frame under a UID derived from it, and the job says so.
        frame_of_reference = derive_uid(first.series_instance_uid, "frame-of-reference")
        warnings = (
            f"series {first.series_instance_uid}: no FrameOfReferenceUID on any slice (stripped by an "
            f"anonymiser?); taken as one frame of reference, results use {frame_of_reference}",
        )
    return Volume(
        array=array,
        affine=affine,
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        frame_of_reference_uid=frame_of_reference,
        warnings=warnings,
        modality=first.modality,
        source_instances=tuple(
            InstanceRef(h.sop_class_uid, h.sop_instance_uid, f.frame_number) for h, f in frames
        ),
    )
