"""Every transfer syntax in testdata/transfer_syntaxes decodes to the pixels of its uncompressed twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.decode import read_frames
from pipeline.geometry import load_volume
from tests.paths import TESTDATA

TS = TESTDATA / "transfer_syntaxes"
EMRI_REF = TESTDATA / "enhanced_multiframe" / "emri_small.dcm"

# (file, transfer syntax UID it must carry, reference file, max abs difference allowed)
CASES = [
    ("siemens_mr_2_implicit_le.dcm", "1.2.840.10008.1.2", TS / "siemens_mr_1_explicit_le_REF.dcm", 0),
    ("siemens_mr_3_explicit_be.dcm", "1.2.840.10008.1.2.2", TS / "siemens_mr_1_explicit_le_REF.dcm", 0),
    ("siemens_mr_4_rle.dcm", "1.2.840.10008.1.2.5", TS / "siemens_mr_1_explicit_le_REF.dcm", 0),
    (
        "siemens_mr_5_jpeg_lossless_sv1.dcm",
        "1.2.840.10008.1.2.4.70",
        TS / "siemens_mr_1_explicit_le_REF.dcm",
        0,
    ),
    (
        "siemens_mr_6_jpeg_lossless_sv1_gdcm.dcm",
        "1.2.840.10008.1.2.4.70",
        TS / "siemens_mr_1_explicit_le_REF.dcm",
        0,
    ),
    (
        "siemens_mr_7_jpegls_lossless_gdcm.dcm",
        "1.2.840.10008.1.2.4.80",
        TS / "siemens_mr_1_explicit_le_REF.dcm",
        0,
    ),
    (
        "siemens_mr_8_jpegls_lossless_dcmtk.dcm",
        "1.2.840.10008.1.2.4.80",
        TS / "siemens_mr_1_explicit_le_REF.dcm",
        0,
    ),
    ("siemens_mr_9_j2k_lossless.dcm", "1.2.840.10008.1.2.4.90", TS / "siemens_mr_1_explicit_le_REF.dcm", 0),
    ("mr_small_implicit_le.dcm", "1.2.840.10008.1.2", TS / "mr_small_explicit_le_REF.dcm", 0),
    ("mr_small_explicit_be.dcm", "1.2.840.10008.1.2.2", TS / "mr_small_explicit_le_REF.dcm", 0),
    ("mr_small_rle.dcm", "1.2.840.10008.1.2.5", TS / "mr_small_explicit_le_REF.dcm", 0),
    ("mr_small_jpegls_lossless.dcm", "1.2.840.10008.1.2.4.80", TS / "mr_small_explicit_le_REF.dcm", 0),
    ("mr_small_j2k_lossless.dcm", "1.2.840.10008.1.2.4.90", TS / "mr_small_explicit_le_REF.dcm", 0),
    ("emri_small_explicit_be.dcm", "1.2.840.10008.1.2.2", EMRI_REF, 0),
    ("emri_small_rle.dcm", "1.2.840.10008.1.2.5", EMRI_REF, 0),
    ("emri_small_jpegls_lossless.dcm", "1.2.840.10008.1.2.4.80", EMRI_REF, 0),
    ("emri_small_j2k_lossless.dcm", "1.2.840.10008.1.2.4.90", EMRI_REF, 0),
    ("sc_rgb_rle.dcm", "1.2.840.10008.1.2.5", TS / "sc_rgb_explicit_le_REF.dcm", 0),
    ("sc_rgb_jpeg_lossless_sv1_gdcm.dcm", "1.2.840.10008.1.2.4.70", TS / "sc_rgb_explicit_le_REF.dcm", 0),
    # Lossy JPEG baseline (YBR_FULL, converted to RGB): MANIFEST states max abs diff 6 against the REF.
    ("sc_rgb_jpeg_baseline_dcmtk.dcm", "1.2.840.10008.1.2.4.50", TS / "sc_rgb_explicit_le_REF.dcm", 6),
]


def _decoded(path: Path) -> np.ndarray:
    """All frames through the service's decoder: (frames, rows, columns[, samples])."""
    return np.stack(list(read_frames(path)))


def _reference(path: Path) -> np.ndarray:
    """The uncompressed twin, decoded by plain pydicom (no codec involved), as (frames, ...)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    return arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[None]


@pytest.mark.parametrize(("name", "ts_uid", "ref", "max_diff"), CASES, ids=[c[0] for c in CASES])
def test_transfer_syntax_decodes_to_the_reference_pixels(
    name: str, ts_uid: str, ref: Path, max_diff: int
) -> None:
    path = TS / name
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts_uid
    got, want = _decoded(path), _reference(ref)
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    if max_diff == 0:
        np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))
    else:
        assert int(diff.max()) <= max_diff
        assert float(diff.mean()) < 1.0  # lossy, but the same picture


def test_deflated_explicit_le_decodes() -> None:
    path = TS / "dclunie_image_dfl_deflated.dcm"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    got = _decoded(path)
    assert got.shape == (1, 512, 512)
    np.testing.assert_array_equal(got[0], ds.pixel_array)
    assert int(got.max()) > int(got.min())  # a picture, not a blank


@pytest.mark.parametrize(
    "name",
    [
        "mr_small_implicit_le.dcm",
        "mr_small_explicit_be.dcm",
        "mr_small_rle.dcm",
        "mr_small_jpegls_lossless.dcm",
        "mr_small_j2k_lossless.dcm",
    ],
)
def test_volume_is_identical_whatever_the_transfer_syntax(name: str) -> None:
    reference = load_volume([TS / "mr_small_explicit_le_REF.dcm"])
    vol = load_volume([TS / name])
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_array_equal(vol.affine, reference.affine)
