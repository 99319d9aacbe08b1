"""Series -> Volume geometry on real series, modified copies, and synthetic series with known geometry."""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import format_number_as_ds

from pipeline.errors import GeometryError, PermanentError
from pipeline.geometry import load_volume, shear_angle_deg, slice_normal
from pipeline.series_select import orientation_of
from pipeline.volume import Volume, volume_from_array
from tests.paths import TESTDATA

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
TILT = sorted((TESTDATA / "ct_series" / "gantry_tilt").glob("GE_*.dcm"))
SAGITTAL = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))
ENHANCED = TESTDATA / "enhanced_multiframe"
MALFORMED = TESTDATA / "malformed"


# --- a writer of synthetic single-frame series with known geometry (also used by test_series_select) ---


def _ds(values: Sequence[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def write_slice(
    path: Path,
    *,
    position: Sequence[float],
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    pixels: np.ndarray | None = None,
    rows: int = 4,
    columns: int = 3,
    series_uid: str = "1.2.826.0.1.3680043.10.1.1",
    sop_uid: str = "1.2.826.0.1.3680043.10.1.1.1",
    sop_class: str = CTImageStorage,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 1,
    instance_number: int = 1,
    slice_thickness: float | None = 1.0,
    rescale: tuple[float, float] = (1.0, 0.0),
) -> Path:
    """Write one uncompressed single-frame image; ``pixels`` is (rows, columns) int16."""
    if pixels is None:
        pixels = np.arange(rows * columns, dtype=np.int16).reshape(rows, columns)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.1.9"
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(orientation)
    ds.PixelSpacing = _ds(pixel_spacing)
    if slice_thickness is not None:
        ds.SliceThickness = format_number_as_ds(slice_thickness)
    ds.RescaleSlope = format_number_as_ds(rescale[0])
    ds.RescaleIntercept = format_number_as_ds(rescale[1])
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    directory: Path,
    positions: Sequence[Sequence[float] | np.ndarray],
    *,
    prefix: str = "s",
    series_uid: str = "1.2.826.0.1.3680043.10.1.1",
    instance_numbers: Sequence[int] | None = None,
    rows: int = 4,
    columns: int = 3,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    rescale: tuple[float, float] = (1.0, 0.0),
    slice_thickness: float | None = 1.0,
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 1,
) -> list[Path]:
    """One file per position; slice ``s`` (SOP Instance UID ``<series>.<s+1>``) holds ``1000 s + 10 row + col``."""
    paths = []
    for s, position in enumerate(positions):
        r, c = np.mgrid[0:rows, 0:columns]
        paths.append(
            write_slice(
                directory / f"{prefix}{s:03d}.dcm",
                position=[float(v) for v in position],
                pixels=(1000 * s + 10 * r + c).astype(np.int16),
                series_uid=series_uid,
                sop_uid=f"{series_uid}.{s + 1}",
                instance_number=s + 1 if instance_numbers is None else instance_numbers[s],
                orientation=orientation,
                pixel_spacing=pixel_spacing,
                rescale=rescale,
                slice_thickness=slice_thickness,
                modality=modality,
                sop_class=sop_class,
                image_type=image_type,
                series_number=series_number,
            )
        )
    return paths


def _at(vol: Volume, i: int, j: int, k: int) -> np.ndarray:
    """Patient position (LPS mm) of voxel (i, j, k) through the volume's affine."""
    return vol.index_to_patient(np.array([[i, j, k]], dtype=float))[0]


def _pixel_position(ds: Dataset, i: int, j: int) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1 directly from a header: IPP + i * rowcos * col spacing + j * colcos * row spacing."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp + i * iop[:3] * column_spacing + j * iop[3:] * row_spacing


# --- real series ---


def test_abdomen_ct_is_sorted_along_the_normal_with_hounsfield_units() -> None:
    vol = load_volume(ABDOMEN)
    assert vol.array.shape == (512, 512, 20)
    assert vol.array.dtype == np.float32 and vol.array.flags.c_contiguous
    assert vol.modality == "CT"
    headers = {h.SOPInstanceUID: h for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in ABDOMEN)}
    z = [float(headers[ref.sop_instance_uid].ImagePositionPatient[2]) for ref in vol.source_instances]
    assert z == sorted(z) and z[0] == -804.5 and z[-1] == -766.5
    # InstanceNumber runs the other way here: it is a label, not the order.
    assert [int(headers[r.sop_instance_uid].InstanceNumber) for r in vol.source_instances] == list(
        range(286, 266, -1)
    )
    expected = np.array(
        [
            [0.9765625, 0, 0, -249.51171875],
            [0, 0.9765625, 0, -437.51171875],
            [0, 0, 2.0, -804.5],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(vol.affine, expected, atol=1e-9)
    assert vol.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert all(r.sop_class_uid == CTImageStorage and r.frame_number is None for r in vol.source_instances)
    path_of = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in ABDOMEN}
    for k in (0, 7, 19):
        ds = pydicom.dcmread(path_of[vol.source_instances[k].sop_instance_uid])
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.array[:, :, k], hu.T)  # [i, j] = [column, row]
        for i, j in ((0, 0), (511, 0), (0, 511), (300, 123)):
            np.testing.assert_allclose(_at(vol, i, j, k), _pixel_position(ds, i, j), atol=1e-6)
    assert float(vol.array.min()) >= -1024.0  # air is about -1000 HU, padding -1024


def test_shuffled_files_and_thread_count_give_the_same_volume() -> None:
    reference = load_volume(ABDOMEN, workers=1)
    shuffled = list(ABDOMEN)
    random.Random(4).shuffle(shuffled)
    for vol in (load_volume(shuffled), load_volume(list(reversed(ABDOMEN)), workers=3)):
        np.testing.assert_array_equal(vol.array, reference.array)
        np.testing.assert_array_equal(vol.affine, reference.affine)
        assert vol.source_instances == reference.source_instances


def test_gantry_tilt_series_with_two_spacings_is_refused_naming_values() -> None:
    series_uid = pydicom.dcmread(TILT[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(GeometryError) as err:
        load_volume(TILT)
    message = str(err.value)
    assert series_uid in message
    assert "variable slice spacing" in message
    assert "4.002 mm" in message and "6.999 mm" in message and "1.081 mm" in message
    assert "sheared by 18.5 deg" in message and "GantryDetectorTilt 18.5" in message
    assert isinstance(err.value, PermanentError)


def test_gantry_tilt_uniform_part_gets_an_exact_sheared_affine() -> None:
    files = TILT[:14]  # GE_01..GE_14: one thickness, one spacing, tilted 18.5 deg
    vol = load_volume(files)
    assert vol.array.shape == (512, 512, 14)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    by_uid = {h.SOPInstanceUID: h for h in headers}
    ordered = [by_uid[r.sop_instance_uid] for r in vol.source_instances]
    assert [int(h.InstanceNumber) for h in ordered] == list(range(1, 15))
    step = np.array([float(v) for v in ordered[1].ImagePositionPatient]) - np.array(
        [float(v) for v in ordered[0].ImagePositionPatient]
    )
    np.testing.assert_allclose(vol.affine[:3, 2], step, atol=1e-6)  # the k column is the real step
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 4.22], atol=1e-6)
    assert shear_angle_deg(vol.affine) == pytest.approx(18.5, abs=0.05)
    assert orientation_of([float(v) for v in ordered[0].ImageOrientationPatient]) == "axial"
    for k, ds in enumerate(ordered):
        for i, j in ((0, 0), (511, 511), (17, 400)):
            np.testing.assert_allclose(_at(vol, i, j, k), _pixel_position(ds, i, j), atol=1e-4)


def test_missing_slice_is_reported_as_a_gap() -> None:
    files = TILT[:6] + TILT[7:14]  # GE_07 removed
    with pytest.raises(
        GeometryError, match=r"gap .*1 missing slice\(s\) between InstanceNumber 6 and InstanceNumber 8"
    ):
        load_volume(files)


def test_sagittal_mr_orientation_and_affine() -> None:
    vol = load_volume(SAGITTAL)
    assert vol.array.shape == (256, 256, 16)
    first = pydicom.dcmread(SAGITTAL[0], stop_before_pixels=True)
    iop = [float(v) for v in first.ImageOrientationPatient]
    assert orientation_of(iop) == "sagittal"
    np.testing.assert_allclose(slice_normal(iop), [-1, 0, 0])
    # Normal is -x (row x column = y x -z), so ascending along it starts at the largest x.
    expected = np.array(
        [[0, 0, -4.8, 33.6], [1.015625, 0, 0, -130], [0, -1.015625, 0, 130], [0, 0, 0, 1]], dtype=float
    )
    np.testing.assert_allclose(vol.affine, expected, atol=1e-5)
    assert np.linalg.det(vol.affine[:3, :3]) > 0
    by_uid = {h.SOPInstanceUID: h for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in SAGITTAL)}
    assert [int(by_uid[r.sop_instance_uid].InstanceNumber) for r in vol.source_instances] == list(
        range(25, 9, -1)
    )


def test_enhanced_ct_frames_are_sorted_by_position_and_rescaled() -> None:
    path = ENHANCED / "nema_enhCT_eCT_Supplemental.dcm"
    vol = load_volume([path])
    ds = pydicom.dcmread(path)
    assert [r.frame_number for r in vol.source_instances] == [2, 1]  # frame 2 is lower along the normal
    assert all(r.sop_class_uid == ds.SOPClassUID for r in vol.source_instances)
    expected = np.array(
        [[-0.388672, 0, 0, 99.5], [0, 0.388672, 0, -301.5], [0, 0, -10, -149], [0, 0, 0, 1]], dtype=float
    )
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    frames = ds.pixel_array.astype(np.float32) - 1024.0  # shared PixelValueTransformationSequence
    np.testing.assert_array_equal(vol.array[:, :, 0], frames[1].T)
    np.testing.assert_array_equal(vol.array[:, :, 1], frames[0].T)


def test_enhanced_mr_single_time_point_loads_with_frame_numbers() -> None:
    vol = load_volume([ENHANCED / "siemens_xa10_enhMR_6_1.dcm"])
    assert vol.array.shape == (64, 64, 6)
    assert [r.frame_number for r in vol.source_instances] == [1, 2, 3, 4, 5, 6]
    assert vol.spacing == pytest.approx((3.375, 3.375, 2.4), abs=1e-6)
    assert orientation_of([1, -5e-13, 1e-06, -5e-13, 1, 1e-06]) == "axial"


@pytest.mark.parametrize(
    ("files", "pattern"),
    [
        (
            sorted(ENHANCED.glob("siemens_xa10_enhMR_6_*.dcm")),
            r"duplicate slice positions: 24 images at 6 distinct positions",
        ),
        (
            [ENHANCED / "philips_enhMR_IM_0027_fMAP.dcm"],
            r"duplicate slice positions: 64 images at 32 distinct",
        ),
        ([ENHANCED / "emri_small.dcm"], r"10 frames but no PerFrameFunctionalGroupsSequence"),
    ],
    ids=["siemens-4-time-points", "philips-magnitude-and-fieldmap", "emri-no-functional-groups"],
)
def test_enhanced_multiframe_refusals(files: list[Path], pattern: str) -> None:
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(GeometryError, match=pattern) as err:
        load_volume(files)
    assert series_uid in str(err.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("01_truncated_in_pixeldata.dcm", r"cannot decode the pixel data .*ValueError"),
        ("02_truncated_in_header.dcm", r"SeriesInstanceUID '' is missing"),
        ("03_missing_sop_instance_uid.dcm", r"SOPInstanceUID '' is missing"),
        (
            "04_sop_instance_uid_path_traversal.dcm",
            r"SOPInstanceUID '\.\./\.\./etc/x' is missing or not a valid UID",
        ),
        ("05_sop_instance_uid_too_long.dcm", r"SOPInstanceUID '1\.2\.[0-9.]+' is missing or not a valid UID"),
        ("06_sop_instance_uid_empty.dcm", r"SOPInstanceUID '' is missing"),
        ("07_bad_dicm_prefix.dcm", r"not a DICOM file"),
        ("08_pixeldata_length_mismatch.dcm", r"cannot decode the pixel data"),
        ("09_transfer_syntax_mismatch.dcm", r"SOPClassUID '' is missing"),
        ("10_not_dicom.dcm", r"not a DICOM file"),
        ("11_sop_class_mismatch_meta_vs_dataset.dcm", r"MediaStorageSOPClassUID .* differs"),
        ("12_empty_file.dcm", r"not a DICOM file"),
        ("13_anonymizer_blanked_uids.dcm", r"SOPClassUID '' is missing"),
    ],
)
def test_malformed_files_give_clear_errors(name: str, pattern: str) -> None:
    with pytest.raises(GeometryError, match=pattern):
        load_volume([MALFORMED / name])


def test_same_instance_twice_is_refused() -> None:
    # 01_truncated_in_pixeldata is a copy of GE_01 (same SOP Instance UID).
    with pytest.raises(GeometryError, match=r"appears twice"):
        load_volume([*TILT[:3], MALFORMED / "01_truncated_in_pixeldata.dcm"])


def test_files_of_two_series_are_refused() -> None:
    with pytest.raises(GeometryError, match=r"files of 2 series"):
        load_volume([*ABDOMEN[:2], *SAGITTAL[:2]])


def test_mosaic_is_refused() -> None:
    with pytest.raises(GeometryError, match=r"MOSAIC"):
        load_volume([TESTDATA / "transfer_syntaxes" / "siemens_mr_1_explicit_le_REF.dcm"])


def test_single_slice_takes_its_thickness_along_the_normal() -> None:
    vol = load_volume([TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"])
    assert vol.array.shape == (64, 64, 1)
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 0.8])


# --- modified copies of real files ---


def _copies(tmp_path: Path, files: Sequence[Path], edit: Callable[[int, Dataset], None]) -> list[Path]:
    out = []
    for n, src in enumerate(files):
        ds = pydicom.dcmread(src)
        edit(n, ds)
        dst = tmp_path / src.name
        ds.save_as(dst)
        out.append(dst)
    return out


def test_non_square_pixels_map_row_and_column_spacing(tmp_path: Path) -> None:
    def edit(n: int, ds: Dataset) -> None:
        ds.PixelSpacing = [0.5, 1.0]  # row spacing 0.5 mm, column spacing 1.0 mm (PS3.3 10.7.1.3)

    files = _copies(tmp_path, ABDOMEN[:3], edit)
    vol = load_volume(files)
    np.testing.assert_allclose(vol.affine[:3, 0], [1.0, 0, 0])  # i: along a row, column spacing
    np.testing.assert_allclose(vol.affine[:3, 1], [0, 0.5, 0])  # j: down a column, row spacing
    assert vol.spacing == pytest.approx((1.0, 0.5, 2.0))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    k = [r.sop_instance_uid for r in vol.source_instances].index(ds.SOPInstanceUID)
    np.testing.assert_allclose(_at(vol, 100, 7, k), _pixel_position(ds, 100, 7))


@pytest.mark.parametrize(
    ("keyword", "value", "pattern"),
    [
        ("ImagePositionPatient", None, r"ImagePositionPatient missing"),
        ("PixelSpacing", None, r"PixelSpacing missing"),
        ("ImageOrientationPatient", [0, 1, 0, 1, 0, 0], r"mixed orientations"),
        ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], r"not two orthogonal unit vectors"),
        ("PixelSpacing", [0.5, 0.5], r"mixed PixelSpacing"),
        ("FrameOfReferenceUID", "1.2.3.4", r"mixed FrameOfReferenceUID"),
    ],
)
def test_inconsistent_slice_is_refused(tmp_path: Path, keyword: str, value: object, pattern: str) -> None:
    def edit(n: int, ds: Dataset) -> None:
        if n == 1:
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    files = _copies(tmp_path, ABDOMEN[:3], edit)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(GeometryError, match=pattern) as err:
        load_volume(files)
    assert series_uid in str(err.value)


# --- synthetic series ---


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path, [(0, 0, 0), (0, 0, 2), (0, 0, 2), (0, 0, 4)])
    with pytest.raises(GeometryError, match=r"duplicate slice positions: 4 images at 3 distinct positions"):
        load_volume(files)


def test_mixed_image_sizes_are_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path, [(0, 0, 0), (0, 0, 1)], prefix="a")
    files.append(
        write_slice(tmp_path / "b.dcm", position=(0, 0, 2), rows=5, sop_uid="1.2.826.0.1.3680043.10.1.1.99")
    )
    with pytest.raises(GeometryError, match=r"mixed image sizes"):
        load_volume(files)


def test_varying_in_plane_shift_is_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path, [(0, 0, 0), (0, 0, 1), (3, 0, 2), (3, 0, 3)])
    with pytest.raises(GeometryError, match=r"shift in-plane by varying amounts"):
        load_volume(files)


def test_shear_beyond_any_gantry_tilt_is_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path, [(0, 0, 0), (2, 0, 1), (4, 0, 2)])  # 63 deg
    with pytest.raises(GeometryError, match=r"sheared by 63\.4 deg"):
        load_volume(files)


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    files = write_series(tmp_path, [(0, 0, 0), (0, 0, 1)], rescale=(2.5, -100.0))
    vol = load_volume(files)
    r, c = np.mgrid[0:4, 0:3]
    np.testing.assert_allclose(vol.array[:, :, 1], ((1000 + 10 * r + c) * 2.5 - 100.0).T)


def test_volume_from_array_is_deterministic_and_validated() -> None:
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    a = volume_from_array(np.zeros((4, 3, 2), np.float32), affine, modality="CT", uid_seed="phantom-1")
    b = volume_from_array(np.zeros((4, 3, 2), np.float32), affine, modality="CT", uid_seed="phantom-1")
    assert a.series_instance_uid == b.series_instance_uid and a.source_instances == b.source_instances
    assert a.source_instances[0].sop_class_uid == CTImageStorage
    assert len({r.sop_instance_uid for r in a.source_instances}) == 2
    assert volume_from_array(np.zeros((1, 1, 1)), affine).source_instances[0].sop_class_uid == (
        SecondaryCaptureImageStorage
    )
    with pytest.raises(ValueError, match="singular"):
        volume_from_array(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))


def _rotation(q: tuple[float, float, float, float]) -> np.ndarray:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


_unit = st.floats(-1.0, 1.0, allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(
    q=st.tuples(_unit, _unit, _unit, _unit).filter(lambda q: float(np.linalg.norm(q)) > 0.2),
    row_spacing=st.floats(0.2, 5.0),
    column_spacing=st.floats(0.2, 5.0),
    slice_spacing=st.floats(0.5, 10.0),
    origin=st.tuples(*[st.floats(-400.0, 400.0)] * 3),
    # In-plane part of the step per mm along the normal; below tan(29 deg), inside a gantry's range.
    shear=st.tuples(st.floats(-0.55, 0.55), st.floats(-0.55, 0.55)).filter(lambda s: math.hypot(*s) < 0.55),
    n=st.integers(2, 5),
    data=st.data(),
)
def test_random_orientations_spacings_and_tilts_round_trip(
    q: tuple[float, float, float, float],
    row_spacing: float,
    column_spacing: float,
    slice_spacing: float,
    origin: tuple[float, float, float],
    shear: tuple[float, float],
    n: int,
    data: st.DataObject,
) -> None:
    rot = _rotation(q)
    row_cos, column_cos, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    step = slice_spacing * (normal + shear[0] * row_cos + shear[1] * column_cos)
    positions = [np.asarray(origin) + s * step for s in range(n)]
    order = data.draw(st.permutations(range(n)), label="file order")
    labels = data.draw(st.permutations(range(1, n + 1)), label="InstanceNumbers (labels, not the order)")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_series(
            Path(tmp),
            positions,
            orientation=[*row_cos, *column_cos],
            pixel_spacing=(row_spacing, column_spacing),
            instance_numbers=labels,
        )
        vol = load_volume([files[s] for s in order])
        headers = {h.SOPInstanceUID: h for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)}
    assert vol.array.shape == (3, 4, n)  # [columns, rows, slices]
    along = [
        float(np.asarray(headers[r.sop_instance_uid].ImagePositionPatient, float) @ normal)
        for r in vol.source_instances
    ]
    assert along == sorted(along)
    assert vol.spacing == pytest.approx((column_spacing, row_spacing, float(np.linalg.norm(step))), rel=1e-6)
    for k, ref in enumerate(vol.source_instances):
        ds = headers[ref.sop_instance_uid]
        s = int(ref.sop_instance_uid.rsplit(".", 1)[1]) - 1
        i = data.draw(st.integers(0, 2), label="i")
        j = data.draw(st.integers(0, 3), label="j")
        # Within 2 um: DS rounding plus SNAP_TOL_MM (a sub-um drift is snapped onto the normal).
        np.testing.assert_allclose(_at(vol, i, j, k), _pixel_position(ds, i, j), atol=2e-3)
        assert vol.array[i, j, k] == 1000 * s + 10 * j + i  # pixel (row j, column i) of that slice
    expected_shear = math.degrees(math.atan(math.hypot(*shear)))
    assert shear_angle_deg(vol.affine) == pytest.approx(expected_shear, abs=0.01)


def test_tiny_consistent_shear_is_kept_exactly_over_a_long_stack(tmp_path: Path) -> None:
    # 0.006 deg of shear: 0.0001 mm per step, 0.0119 mm over 120 slices; snapping it away would misplace
    # the last slice by more than SNAP_TOL_MM, so the real step vector is kept.
    files = write_series(tmp_path, [(1e-4 * s, 0.0, 1.0 * s) for s in range(120)])
    vol = load_volume(files)
    np.testing.assert_allclose(vol.affine[:3, 2], [1e-4, 0, 1.0], atol=1e-9)
    np.testing.assert_allclose(_at(vol, 0, 0, 119), [0.0119, 0, 119.0], atol=1e-9)
