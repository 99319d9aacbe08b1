"""The phantom generator: a real CT series, consistent geometry, exact ground truth, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.demo.phantom import (
    CT_IMAGE_STORAGE,
    GroundTruth,
    PhantomOptions,
    lesion_coverage,
    lesion_label_map,
    make_phantom_volume,
    phantom_ground_truth,
    write_phantom_series,
)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    out = tmp_path_factory.mktemp("phantom")
    return out, write_phantom_series(out, seed=7, lesions=2, slices=64)


def _read(out: Path) -> list[pydicom.Dataset]:
    return sorted(
        (pydicom.dcmread(p) for p in out.glob("*.dcm")), key=lambda ds: float(ds.ImagePositionPatient[2])
    )


def test_series_is_a_readable_ct_series(series: tuple[Path, GroundTruth]) -> None:
    out, gt = series
    datasets = _read(out)
    assert len(datasets) == 64
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == (
            gt.study_instance_uid, gt.series_instance_uid, gt.frame_of_reference_uid)  # fmt: skip
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert (ds.Rows, ds.Columns, ds.RescaleIntercept, ds.RescaleSlope) == (512, 512, -1024, 1)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "AccessionNumber", "ReferringPhysicianName", "StudyID", "SeriesNumber", "KVP"):  # fmt: skip
            assert keyword in ds, keyword
        assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
    assert len({ds.SOPInstanceUID for ds in datasets}) == 64
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == list(range(1, 65))


def test_geometry_matches_the_ground_truth_affine(series: tuple[Path, GroundTruth]) -> None:
    out, gt = series
    affine = np.array(gt.affine)
    spacing = np.diag(affine)[:3]
    assert 0.7 <= spacing[0] == spacing[1] <= 0.8 and spacing[2] == 2.5
    for k, ds in enumerate(_read(out)):
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        # PS3.3 C.7.6.2.1.1: PixelSpacing is [row spacing (along y), column spacing (along x)]
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([spacing[1], spacing[0]])
        assert float(ds.SliceThickness) == pytest.approx(spacing[2])
        expected = affine @ np.array([0, 0, k, 1.0])
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(expected[:3].tolist(), abs=1e-4)


def test_pixels_and_mask_match_the_in_memory_phantom(series: tuple[Path, GroundTruth]) -> None:
    out, gt = series
    volume, label, gt_memory = make_phantom_volume(seed=7, lesions=2, slices=64)
    assert gt_memory == gt == GroundTruth.from_json((out / "ground_truth.json").read_text())
    hu = np.stack([ds.pixel_array.T.astype(np.float32) - 1024 for ds in _read(out)], axis=-1)
    np.testing.assert_array_equal(hu, volume.array)
    np.testing.assert_array_equal(np.load(out / "ground_truth_mask.npy"), label)
    np.testing.assert_array_equal(lesion_label_map(gt), label)
    raw = json.loads((out / "ground_truth.json").read_text())
    assert {"centre_lps", "radius_mm", "volume_ml", "voxel_volume_ml", "contrast_hu"} <= set(
        raw["lesions"][0]
    )
    assert raw["seed"] == 7 and raw["noise_sd_hu"] == gt.noise_sd_hu


def test_lesions_sit_in_the_liver_with_their_contrast(series: tuple[Path, GroundTruth]) -> None:
    _, gt = series
    volume, label, _ = make_phantom_volume(seed=7, lesions=2, slices=64)
    noise = gt.noise_sd_hu
    for lesion in gt.lesions:
        assert 2.0 <= lesion.volume_ml <= 30.0 and -80 <= lesion.contrast_hu <= -40
        core = label == lesion.label
        assert int(core.sum()) == lesion.voxel_count
        measured = volume.array[core].mean() - gt.organ_hu
        # The rim is partial-volume, so the mean contrast is slightly under the nominal one.
        assert lesion.contrast_hu - 3 * noise / np.sqrt(core.sum()) <= measured <= 0.8 * lesion.contrast_hu
    assert 10.0 <= noise <= 20.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), lesions=st.integers(0, 3))
def test_voxel_volumes_match_analytic_volumes(seed: int, lesions: int) -> None:
    gt = phantom_ground_truth(seed, lesions)
    assert len(gt.lesions) == lesions
    voxel_ml = float(np.prod(np.diag(np.array(gt.affine))[:3])) / 1000
    for lesion in gt.lesions:
        assert lesion.voxel_volume_ml == pytest.approx(lesion.voxel_count * voxel_ml)
        # Discretisation error of a >= 2 mL ellipsoid sampled at 0.7-0.8 x 2.5 mm voxel centres.
        assert lesion.voxel_volume_ml == pytest.approx(lesion.volume_ml, rel=0.08)
        r = lesion.radius_mm
        assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * r**3 / 1000)


def test_partial_volume_coverage_sums_to_the_analytic_volume() -> None:
    gt = phantom_ground_truth(3, 3)
    affine = np.array(gt.affine)
    coverage = lesion_coverage(gt, affine, gt.shape)
    voxel_ml = float(np.prod(np.diag(affine)[:3])) / 1000
    total = sum(lesion.volume_ml for lesion in gt.lesions)
    assert float(coverage.sum()) * voxel_ml == pytest.approx(total, rel=0.01)


def test_same_seed_same_phantom_and_lesion_free_control() -> None:
    region = (slice(100, 400), slice(100, 400), slice(0, 64))
    a, label_a, gt_a = make_phantom_volume(11, 2, region=region)
    b, _, gt_b = make_phantom_volume(11, 2, region=region)
    np.testing.assert_array_equal(a.array, b.array)
    assert gt_a == gt_b
    other, _, gt_other = make_phantom_volume(12, 2, region=region)
    assert gt_other.study_instance_uid != gt_a.study_instance_uid and not np.array_equal(other.array, a.array)
    free, label_free, gt_free = make_phantom_volume(11, 0, region=region)
    assert gt_free.lesions == () and not label_free.any()
    # Same body and noise: the images differ only where a lesion covers part of a voxel.
    covered = lesion_coverage(gt_a, a.affine, a.array.shape) > 0
    changed = a.array != free.array
    assert changed.any() and not (changed & ~covered).any()
    assert label_a.any() and not (label_a.astype(bool) & ~covered).any()


def test_region_is_a_crop_of_the_series_grid() -> None:
    region = (slice(200, 260), slice(150, 230), slice(10, 40))
    volume, label, gt = make_phantom_volume(5, 2, region=region)
    assert volume.array.shape == label.shape == (60, 80, 30)
    full = np.array(gt.affine)
    np.testing.assert_allclose(volume.affine[:3, 3], (full @ np.array([200, 150, 10, 1.0]))[:3])
    np.testing.assert_array_equal(label, lesion_label_map(gt)[region])
    assert len(volume.source_instances) == 30


def test_options_smaller_and_fainter_lesions() -> None:
    small = phantom_ground_truth(2, 3, options=PhantomOptions.small_lesions())
    assert all(0.2 <= lesion.volume_ml <= 2.0 for lesion in small.lesions)
    faint = phantom_ground_truth(2, 3, options=PhantomOptions.faint_lesions())
    assert all(-40 <= lesion.contrast_hu <= -15 for lesion in faint.lesions)
    with pytest.raises(ValueError, match="lesion_volume_ml"):
        PhantomOptions(lesion_volume_ml=(3.0, 1.0))


@pytest.mark.peer
def test_dciodvfy_accepts_the_series(series: tuple[Path, GroundTruth]) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed")
    out, _ = series
    for path in sorted(out.glob("*.dcm"))[::21]:
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        report = result.stdout + result.stderr
        assert "CTImage" in report
        assert not [line for line in report.splitlines() if line.startswith(("Error", "Warning"))], report
