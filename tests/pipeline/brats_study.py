"""Four MR series of one study for brats_mri_segmentation, derived at test time from the real MR.

The real sagittal T1 of testdata (256 x 256 x 16), each slice cropped to its central 64 x 64 pixels,
becomes four series of a new study with the same Frame of Reference (unless asked otherwise), each
with its own SeriesInstanceUID, SeriesNumber, SeriesDescription and a non-linear intensity transform,
so that the channels stay distinguishable after brats' channel-wise z-score:

=========  =================  ==================  ===========================================
channel    SeriesDescription  ContrastBolusAgent  pixels (x: the cropped original)
=========  =================  ==================  ===========================================
0 T1c      SAG T1 POST GAD    GADOLINIUM          x
1 T1       SAG T1             (none)              round(64 sqrt(x))
2 T2       SAG T2 FSE         (none)              max(x) - x, every second pixel (2x spacing)
3 FLAIR    SAG T2 FLAIR       (none)              round(x^2 / max(x))
=========  =================  ==================  ===========================================

SeriesNumbers run against the channel order (FLAIR 1 ... T1c 4), so an order taken from the
series instead of the declaration shows. T2 is on a coarser grid: it must be resampled. Nothing is
written outside ``out``; no data is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.paths import TESTDATA

SOURCE = TESTDATA / "mr_series" / "sag_t1_fl2d_HFS"
CHANNELS = ("T1c", "T1", "T2", "FLAIR")
DESCRIPTIONS = {"T1c": "SAG T1 POST GAD", "T1": "SAG T1", "T2": "SAG T2 FSE", "FLAIR": "SAG T2 FLAIR"}
SERIES_NUMBERS = {"T1c": 4, "T1": 3, "T2": 2, "FLAIR": 1}
# The routing of each channel, as a [[pipelines.monai.channels]] entry would declare it.
RULES: dict[str, dict[str, object]] = {
    "T1c": {"series_description": "(?i)\\bt1\\b", "contrast": True},
    "T1": {"series_description": "(?i)\\bt1\\b", "contrast": False},
    "T2": {"series_description": "(?i)\\bt2\\b(?!.*flair)"},
    "FLAIR": {"series_description": "(?i)flair"},
}
CROP = 64


def _source_slices() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(SOURCE.glob("*.dcm"))]


def transforms(peak: float) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The intensity transform of each channel (float in, float out; ``peak`` = max of the original)."""
    return {
        "T1c": lambda x: x,
        "T1": lambda x: np.round(64.0 * np.sqrt(x)),
        "T2": lambda x: peak - x,
        "FLAIR": lambda x: np.round(x * x / peak),
    }


def peak_value() -> float:
    """The largest pixel of the cropped original (the transforms' ``peak``)."""
    return float(max(_crop(ds)[0].max() for ds in _source_slices()))


def _crop(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The central CROP x CROP pixels (float) and the crop's first-pixel position (LPS mm)."""
    r0, c0 = (int(ds.Rows) - CROP) // 2, (int(ds.Columns) - CROP) // 2
    pixels = ds.pixel_array[r0 : r0 + CROP, c0 : c0 + CROP].astype(np.float64)
    row_dir = np.array(ds.ImageOrientationPatient[:3], float)
    col_dir = np.array(ds.ImageOrientationPatient[3:], float)
    spacing_row, spacing_col = (float(v) for v in ds.PixelSpacing)
    origin = (
        np.array(ds.ImagePositionPatient, float) + c0 * spacing_col * row_dir + r0 * spacing_row * col_dir
    )
    return pixels, origin


def write_brats_study(
    out: Path,
    *,
    channels: Sequence[str] = CHANNELS,
    other_frame_of_reference: Sequence[str] = (),
    study_uid: str | None = None,
) -> dict[str, list[Path]]:
    """Write the derived series named in ``channels`` under ``out/<channel>/``; their files by channel.

    ``other_frame_of_reference``: channels written with a Frame of Reference of their own.
    """
    slices = _source_slices()
    peak = peak_value()
    study = study_uid or generate_uid()
    frame = generate_uid()
    written: dict[str, list[Path]] = {}
    for name in channels:
        series_uid = generate_uid()
        own_frame = generate_uid() if name in other_frame_of_reference else frame
        folder = out / name
        folder.mkdir(parents=True)
        paths = []
        for n, source in enumerate(slices):
            ds = pydicom.dcmread(sorted(SOURCE.glob("*.dcm"))[n])
            pixels, origin = _crop(source)
            values = transforms(peak)[name](pixels)
            spacing = [float(v) for v in ds.PixelSpacing]
            if name == "T2":  # a coarser grid: every second row and column, the same field of view
                values = values[::2, ::2]
                spacing = [2 * s for s in spacing]
            values = np.clip(values, 0, 4095).astype(np.uint16)
            ds.ImagePositionPatient = [f"{v:.6f}" for v in origin]
            ds.PixelSpacing = [f"{s:.6f}" for s in spacing]
            ds.Rows, ds.Columns = values.shape
            ds.PixelData = np.ascontiguousarray(values).tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = own_frame
            ds.SeriesNumber = SERIES_NUMBERS[name]
            ds.SeriesDescription = DESCRIPTIONS[name]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ImageType = ["DERIVED", "SECONDARY"]
            if name == "T1c":
                ds.ContrastBolusAgent = "GADOLINIUM"
            elif "ContrastBolusAgent" in ds:
                del ds.ContrastBolusAgent
            target = folder / f"{n:03d}.dcm"
            ds.save_as(target, enforce_file_format=True)
            paths.append(target)
        written[name] = paths
    return written
