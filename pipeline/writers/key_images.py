"""Lesions -> key images: one Secondary Capture per lesion (PS3.3 A.8.1), for people, not for diagnosis.

Each key image is the source slice through the lesion's largest cross-section (the slice of the
lesion map with most of its voxels; the first such slice on a tie), windowed for display, scaled
up by a whole factor (nearest neighbour) to at least ``MIN_SIZE`` pixels across, with the lesion's
outline drawn just outside its voxels (so the edge stays visible), a banner saying "NOT FOR
DIAGNOSTIC USE" and a caption naming the lesion, its measurements and the model. The pixels carry
text, so Burned In Annotation is YES (PS3.3 C.7.6.1.1.11): a PACS that de-identifies knows to look.

The images go to a new series of the source study (Series Number ``ResultSeries.KEY_IMAGES``) with
UIDs derived from the input fingerprint and the lesion's tracking key, so a re-run is a duplicate.
Each references its source slice (Source Image Sequence) and names every model behind it as an
IHE AIR Contributing Equipment item (``output.finalize_output``). Pure: no clock, the analysis time
is passed in.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM
from scipy import ndimage

from pipeline.findings import Detection, Findings
from pipeline.uids import (
    DEVICE_OBSERVER_UID,
    MANUFACTURER,
    PRODUCT_NAME,
    SOFTWARE_VERSION,
    ResultSeries,
    finding_tracking_uid,
    result_uids,
)
from pipeline.volume import Volume
from pipeline.writers.output import finalize_output, ihe_scheme_identification, patient_study_header

__all__ = [
    "BANNER_TEXT",
    "KEY_IMAGES_SERIES_NUMBER",
    "OUTLINE_RGB",
    "SALIENCY_THRESHOLD",
    "TEXT_RGB",
    "KeyImageLayout",
    "largest_cross_section",
    "patient_orientation",
    "box_mask",
    "render",
    "write_box_key_images",
    "write_key_images",
]

KEY_IMAGES_SERIES_NUMBER = int(ResultSeries.KEY_IMAGES)
BANNER_TEXT = "NOT FOR DIAGNOSTIC USE"
OUTLINE_RGB = (255, 40, 40)
TEXT_RGB = (255, 220, 0)
CAPTION_LINES = 2  # lesion and measurements; slice and model
MIN_SIZE = 512  # pixels across: room for legible burned-in text on a 128-pixel source
OUTLINE_PIXELS = 3  # outline thickness in output pixels
# Optional saliency overlay (Grad-CAM, pipeline.saliency): tinted only where saliency > the threshold,
# from yellow (at the threshold) to orange (at 1), semi-transparent, under the outline.
SALIENCY_THRESHOLD = 0.5
SALIENCY_ALPHA = 0.4
# Display window when the source has none: soft tissue for CT (PS3.3 C.11.2.1.2 window center/width).
CT_WINDOW = (40.0, 400.0)
_ORIENTATION_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (LPS)


def largest_cross_section(lesion_map: np.ndarray, value: int) -> int:
    """Slice index ``k`` where lesion ``value`` of ``lesion_map`` ([i, j, k]) has most voxels (first on a tie)."""
    counts = np.count_nonzero(lesion_map == value, axis=(0, 1))
    if not counts.any():
        raise ValueError(f"lesion {value} has no voxel in the lesion map: it has no cross-section")
    return int(np.argmax(counts))


def write_key_images(
    lesion_map: np.ndarray,
    volume: Volume,
    source_datasets: Sequence[Dataset],
    findings: Findings,
    *,
    input_fingerprint: str,
    content_datetime: datetime.datetime,
    series_number: int = KEY_IMAGES_SERIES_NUMBER,
    saliency: np.ndarray | None = None,
    max_images: int | None = None,
) -> tuple[Dataset, ...]:
    """One key image per finding that has voxels in ``lesion_map`` (value n: ``findings.findings[n - 1]``).

    ``max_images``: only the key images of that many findings, the largest by volume (the first in
    findings order on a tie), still in findings order; the others are in the SR only. None: every one.

    A multi-label lesion map is ``[C, i, j, k]``; finding n is in layer ``finding.label``.

    ``source_datasets`` are the headers of the volume's slices in volume order (pixels not needed:
    they come from ``volume``). ``content_datetime`` is when the analysis began. Raises
    ``ValueError`` when the inputs do not line up. ``saliency`` (``[i, j, k]`` on the volume's grid,
    values in [0, 1], e.g. a classifier's Grad-CAM) is blended in where it exceeds ``SALIENCY_THRESHOLD``.
    """
    if lesion_map.shape[-3:] != volume.array.shape or lesion_map.ndim not in (3, 4):
        raise ValueError(
            f"lesion map shape {lesion_map.shape} differs from the volume's {volume.array.shape} "
            f"(series {volume.series_instance_uid})"
        )
    _check_headers(source_datasets, volume)
    if saliency is not None and saliency.shape != volume.array.shape:
        raise ValueError(
            f"saliency map shape {saliency.shape} differs from the volume's {volume.array.shape}"
        )
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1 (None: every lesion), got {max_images!r}")
    series_uid = result_uids(input_fingerprint, findings.algorithm, "key_images").series_instance_uid
    chosen = _largest(findings, set(np.unique(lesion_map).tolist()), max_images)
    images: list[Dataset] = []
    for value, finding in enumerate(findings.findings, start=1):
        if value not in chosen:
            continue
        layer = lesion_map[finding.label] if lesion_map.ndim == 4 else lesion_map  # multi-label: [C, i, j, k]
        k = largest_cross_section(layer, value)
        image = _key_image(
            layer[:, :, k] == value,
            k,
            _Shown(
                caption=f"{finding.tracking_identifier}: {finding.volume_ml:.3g} mL, longest diameter "
                f"{finding.largest_diameter_mm:.3g} mm",
                tracking_uid=finding_tracking_uid(input_fingerprint, findings.algorithm, finding),
                derivation=f"slice through the largest cross-section of {finding.tracking_identifier}",
            ),
            volume,
            source_datasets[k],
            findings,
            series_uid=series_uid,
            series_number=series_number,
            instance_number=len(images) + 1,
            input_fingerprint=input_fingerprint,
            content_datetime=content_datetime,
            saliency_ij=None if saliency is None else saliency[:, :, k],
        )
        images.append(image)
    return tuple(images)


def _largest(findings: Findings, present: set[int], limit: int | None) -> set[int]:
    """Values (1-based finding numbers) in ``present`` of the ``limit`` largest findings (all: None)."""
    values = [v for v in range(1, len(findings.findings) + 1) if v in present]
    if limit is None or len(values) <= limit:
        return set(values)
    return set(sorted(values, key=lambda v: (-findings.findings[v - 1].volume_ml, v))[:limit])


@dataclass(frozen=True)
class _Shown:
    """What one key image shows: its caption's first line, the Tracking UID, how the slice was chosen."""

    caption: str
    tracking_uid: str
    derivation: str


def _key_image(
    mask_ij: np.ndarray,
    k: int,
    shown: _Shown,
    volume: Volume,
    source: Dataset,
    findings: Findings,
    *,
    series_uid: str,
    series_number: int,
    instance_number: int,
    input_fingerprint: str,
    content_datetime: datetime.datetime,
    saliency_ij: np.ndarray | None = None,
) -> Dataset:
    ref = volume.source_instances[k]
    if str(source.get("SOPInstanceUID", "")) != ref.sop_instance_uid:
        raise ValueError(
            f"source header {k} is {source.get('SOPInstanceUID')} but slice {k} of the volume comes from "
            f"{ref.sop_instance_uid}: pass the source headers in volume order"
        )
    layout = KeyImageLayout(volume.array.shape[1], volume.array.shape[0])
    caption = (
        shown.caption,
        f"slice {source.get('InstanceNumber', k + 1)}; {findings.algorithm.name} {findings.algorithm.version}",
    )
    window = _window(source, volume.modality)
    saliency_rc = None if saliency_ij is None else saliency_ij.T
    pixels = render(volume.array[:, :, k].T, mask_ij.T, window, layout, caption, saliency_rc=saliency_rc)
    uids = result_uids(input_fingerprint, findings.algorithm, f"key_image/{shown.tracking_uid}")
    column_mm, row_mm, _ = volume.spacing  # i runs along a row (column spacing), j down a column
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=patient_study_header(source),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=(row_mm / layout.scale, column_mm / layout.scale),  # type: ignore[arg-type]
        patient_orientation=patient_orientation(volume.affine),
        series_description="AI triage key images (not for diagnostic use)",
        manufacturer_model_name=PRODUCT_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number=DEVICE_OBSERVER_UID,
        coding_schemes=[ihe_scheme_identification()],  # 99IHE of the Contributing Equipment purpose
        transfer_syntax_uid=ExplicitVRLittleEndian,  # as the SR and SEG (from_ref_dataset: implicit)
    )
    image.ConversionType = "WSD"  # made on a workstation from other images (PS3.3 C.8.6.1)
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "YES"
    # PS3.3 C.7.3.1 Type 2C (paired body parts): the source's, else empty (unknown).
    image.Laterality = source.get("Laterality", "") or source.get("ImageLaterality", "") or ""
    image.DateOfSecondaryCapture = DA(content_datetime.date())  # highdicom stamps the clock's
    image.TimeOfSecondaryCapture = TM(content_datetime.time())
    image.ImageComments = f"{'; '.join(caption)}. {BANNER_TEXT}."[:10240]
    image.DerivationDescription = (
        f"{shown.derivation}, outlined; "
        f"window {window[0]:g}/{window[1]:g}; "
        f"scaled x{layout.scale} (nearest neighbour)"
        + (
            ""
            if saliency_ij is None
            else f"; classifier Grad-CAM saliency > {SALIENCY_THRESHOLD:g} tinted (not a measurement)"
        )
    )[:1024]
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = ref.sop_class_uid
    source_item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None:
        source_item.ReferencedFrameNumber = ref.frame_number
    image.SourceImageSequence = [source_item]
    finalize_output(image, content_datetime, findings.algorithms)
    return image


# --- boxes of a detection bundle -------------------------------------------------------------------


def box_mask(box: Detection, volume: Volume) -> tuple[int, np.ndarray]:
    """The slice ``k`` through the box's centre, and the ``[i, j]`` pixels of that slice inside the box.

    The slice is the one nearest to the box centre. A pixel is inside when its centre, moved along the
    slice normal into the plane through the box centre and mapped to LPS through ``volume.affine``, lies
    within the box on all three axes: on an axial series that is the box's L and P extent, on a sagittal
    one its P and S extent, on an oblique one the box's section by that plane (an empty mask when the
    box misses the slice's pixel centres).
    """
    inverse = np.linalg.inv(volume.affine)
    centre = inverse @ np.append(np.asarray(box.centre_lps, dtype=float), 1.0)
    k = int(np.clip(np.rint(centre[2]), 0, volume.array.shape[2] - 1))
    ni, nj = volume.array.shape[:2]
    i, j = np.meshgrid(np.arange(ni, dtype=float), np.arange(nj, dtype=float), indexing="ij")
    plane = np.full_like(i, centre[2])  # slice k's pixels, in the plane through the box centre
    points = np.stack([i, j, plane, np.ones_like(i)], axis=-1).reshape(-1, 4) @ volume.affine.T
    lo, hi = np.asarray(box.box_lps[:3]), np.asarray(box.box_lps[3:])
    inside = np.all((points[:, :3] >= lo) & (points[:, :3] <= hi), axis=1)
    return k, inside.reshape(ni, nj)


def _check_headers(source_datasets: Sequence[Dataset], volume: Volume) -> None:
    if len(source_datasets) != len(volume.source_instances):
        raise ValueError(
            f"{len(source_datasets)} source headers for {len(volume.source_instances)} slices of series "
            f"{volume.series_instance_uid}: pass one header per slice, in volume order"
        )


def write_box_key_images(
    volume: Volume,
    source_datasets: Sequence[Dataset],
    findings: Findings,
    *,
    input_fingerprint: str,
    content_datetime: datetime.datetime,
    series_number: int = KEY_IMAGES_SERIES_NUMBER,
) -> tuple[Dataset, ...]:
    """One key image per box of ``findings.detections``: the slice through its centre, the box outlined.

    The outline is drawn just outside the pixels whose centres lie inside the box (:func:`box_mask`);
    a box that covers no pixel centre of its slice gets no key image. Otherwise as
    :func:`write_key_images` (same series, banner, caption, references).
    """
    from pipeline.writers.sr_boxes import box_uid

    _check_headers(source_datasets, volume)
    series_uid = result_uids(input_fingerprint, findings.algorithm, "key_images").series_instance_uid
    images: list[Dataset] = []
    for box in findings.detections:
        k, mask = box_mask(box, volume)
        if not mask.any():
            continue
        width, depth, height = box.size_mm
        shown = _Shown(
            caption=f"{box.tracking_identifier}: score {box.score:.2f}, {width:.3g} x {depth:.3g} x {height:.3g} mm",
            tracking_uid=box_uid(input_fingerprint, findings.algorithm, box),
            derivation=f"slice through the centre of {box.tracking_identifier}, its box",
        )
        image = _key_image(
            mask,
            k,
            shown,
            volume,
            source_datasets[k],
            findings,
            series_uid=series_uid,
            series_number=series_number,
            instance_number=len(images) + 1,
            input_fingerprint=input_fingerprint,
            content_datetime=content_datetime,
        )
        images.append(image)
    return tuple(images)


# --- pixels ---------------------------------------------------------------------------------------


class KeyImageLayout:
    """Where things go on a key image: the scaled slice between a banner (top) and a caption (bottom)."""

    def __init__(self, rows: int, columns: int) -> None:
        self.scale = max(1, math.ceil(MIN_SIZE / max(rows, columns)))
        self.image_rows, self.columns = rows * self.scale, columns * self.scale
        self.band = max(20, self.columns // 22)  # height of a line of text
        self.rows = self.image_rows + (1 + CAPTION_LINES) * self.band

    def banner_box(self) -> tuple[slice, slice]:
        """(rows, columns) of the top band holding ``BANNER_TEXT``."""
        return slice(0, self.band), slice(0, self.columns)

    def image_box(self) -> tuple[slice, slice]:
        """(rows, columns) of the scaled slice."""
        return slice(self.band, self.band + self.image_rows), slice(0, self.columns)

    def caption_box(self) -> tuple[slice, slice]:
        """(rows, columns) of the bottom band holding the caption."""
        return slice(self.band + self.image_rows, self.rows), slice(0, self.columns)


def _window(source: Dataset, modality: str) -> tuple[float, float]:
    """(center, width) to display with: the source's first window, else soft tissue for CT, else None."""
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, Sequence) else center)
        w = float(width[0] if isinstance(width, Sequence) else width)
    except (TypeError, ValueError, IndexError):
        c, w = math.nan, math.nan
    if math.isfinite(c) and math.isfinite(w) and w >= 1:
        return c, w
    if modality == "CT":
        return CT_WINDOW
    return math.nan, math.nan  # no window known: the slice's own range (render)


def render(
    slice_rc: np.ndarray,
    mask_rc: np.ndarray,
    window: tuple[float, float],
    layout: KeyImageLayout,
    caption: Sequence[str],
    *,
    saliency_rc: np.ndarray | None = None,
) -> np.ndarray:
    """The key image's RGB pixels (uint8, rows x columns x 3) of one slice ([row, column]) and lesion mask.

    ``saliency_rc`` ([row, column], values in [0, 1]): tinted where above ``SALIENCY_THRESHOLD``,
    under the outline (which stays visible); None leaves the pixels exactly as without it.
    """
    center, width = window
    if not (math.isfinite(center) and math.isfinite(width)):
        low, high = (float(v) for v in np.percentile(slice_rc, (1, 99)))
        center, width = (low + high) / 2, max(high - low, 1.0)
    gray = np.clip((slice_rc.astype(np.float64) - (center - width / 2)) / width * 255.0, 0, 255)
    gray = np.rint(gray).astype(np.uint8)
    scale = layout.scale
    big = np.repeat(np.repeat(gray, scale, axis=0), scale, axis=1)
    big_mask = np.repeat(np.repeat(mask_rc, scale, axis=0), scale, axis=1)
    outline = ndimage.binary_dilation(big_mask, iterations=OUTLINE_PIXELS) & ~big_mask

    canvas = np.zeros((layout.rows, layout.columns, 3), dtype=np.uint8)
    rows, columns = layout.image_box()
    canvas[rows, columns] = big[:, :, None]
    if saliency_rc is not None:
        _tint(canvas[rows, columns], np.repeat(np.repeat(saliency_rc, scale, axis=0), scale, axis=1))
    canvas[rows, columns][outline] = OUTLINE_RGB
    picture = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(picture)
    _text(draw, BANNER_TEXT, layout.banner_box(), layout.columns)
    caption_rows = layout.caption_box()[0]
    for n, line in enumerate(caption[:CAPTION_LINES]):
        top = caption_rows.start + n * layout.band
        _text(draw, line, (slice(top, top + layout.band), slice(0, layout.columns)), layout.columns)
    return np.asarray(picture, dtype=np.uint8).copy()


def _tint(pixels: np.ndarray, saliency: np.ndarray) -> None:
    """Blend a heat colour into ``pixels`` (in place) where ``saliency`` exceeds ``SALIENCY_THRESHOLD``."""
    hot = saliency > SALIENCY_THRESHOLD
    if not hot.any():
        return
    level = (np.clip(saliency[hot], 0.0, 1.0) - SALIENCY_THRESHOLD) / (1.0 - SALIENCY_THRESHOLD)
    heat = np.stack([np.full_like(level, 255.0), 230.0 - 130.0 * level, np.zeros_like(level)], axis=-1)
    blended = (1.0 - SALIENCY_ALPHA) * pixels[hot].astype(np.float64) + SALIENCY_ALPHA * heat
    pixels[hot] = np.rint(blended).astype(np.uint8)


def _text(draw: ImageDraw.ImageDraw, text: str, box: tuple[slice, slice], columns: int) -> None:
    """Draw ``text`` centred in the band ``box``, as large as fits (Pillow's bundled font: no system fonts)."""
    rows = box[0]
    height = rows.stop - rows.start
    size = max(8, int(height * 0.7))
    while True:
        font = ImageFont.load_default(size=size)
        if draw.textlength(text, font=font) <= columns - 8 or size <= 8:
            break
        size -= 1
    draw.text((columns / 2, rows.start + height / 2), text, fill=TEXT_RGB, font=font, anchor="mm")


def patient_orientation(affine: np.ndarray) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) of a slice of the volume with this ``affine`` (LPS).

    Each value names the directions a row (then a column) runs towards, major axis first, e.g.
    ``("L", "P")`` for an axial slice; an oblique direction gets up to three letters.
    """
    row, column = (affine[:3, axis] / np.linalg.norm(affine[:3, axis]) for axis in (0, 1))
    return _direction(row.tolist()), _direction(column.tolist())


def _direction(cosines: Sequence[float]) -> str:
    order = sorted(range(3), key=lambda axis: -abs(cosines[axis]))
    letters = [
        _ORIENTATION_LETTERS[axis][0 if cosines[axis] > 0 else 1]
        for axis in order
        if abs(cosines[axis]) > 1e-3
    ]
    return "".join(letters)
