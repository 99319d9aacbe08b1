"""Measurements on synthetic label volumes with known answers (spheres under oblique affines)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import morphology
from pipeline.findings import AlgorithmInfo, Classification, Finding, VolumeMethod
from pipeline.labels import LESION, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, is_background, segment_codes
from pipeline.measure import (
    PriorityThresholds,
    findings_from_prediction,
    measure_lesions,
    summary_line,
    triage,
)
from pipeline.morphology import connected_components, max_feret_diameter_mm
from pipeline.volume import InstanceRef, Volume
from vocabulary import Priority


def _volume(array: np.ndarray, affine: np.ndarray) -> Volume:
    refs = tuple(InstanceRef("1.2.840.10008.5.1.4.1.1.2", f"2.25.{k + 1}") for k in range(array.shape[2]))
    return Volume(array, affine, "2.25.10", "2.25.11", "2.25.12", "CT", refs)


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) * c + s * k + (1 - c) * np.outer(axis, axis)


def _oblique_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.array([1.0, 2.0, 0.5]), 27.0) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _sphere(
    shape: tuple[int, int, int], affine: np.ndarray, centre_ijk: np.ndarray, radius_mm: float
) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of the patient point of ``centre_ijk``."""
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    offsets = (ijk - centre_ijk) @ affine[:3, :3].T
    return (np.linalg.norm(offsets, axis=1) <= radius_mm).reshape(shape)


@pytest.fixture(scope="module")
def oblique() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An oblique, anisotropic affine and one sphere (r = 12 mm) centred on voxel (30, 28, 14)."""
    affine = _oblique_affine((0.8, 0.9, 1.6), (-120.0, 35.5, -410.25))
    centre = np.array([30.0, 28.0, 14.0])
    return affine, centre, _sphere((64, 60, 30), affine, centre, 12.0)


def test_sphere_volume_diameter_and_centroid(oblique: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    affine, centre, mask = oblique
    volume = _volume(np.zeros(mask.shape, np.float32), affine)
    (m,), lesion_map = measure_lesions(mask.astype(np.uint8), volume, ("background", "lesion"))

    assert m.label == 1 and m.name == "lesion" and m.tracking_identifier == "lesion 1"
    assert m.probability_volume_ml is None
    assert m.volume_ml == pytest.approx(4 / 3 * math.pi * 12.0**3 / 1000, rel=0.03)
    np.testing.assert_array_equal(lesion_map, mask.astype(np.int32))
    voxel_diagonal = math.sqrt(0.8**2 + 0.9**2 + 1.6**2)
    assert 24.0 - voxel_diagonal <= m.largest_diameter_mm <= 24.0 + 1e-9
    # The discretised sphere is point-symmetric about its centre voxel: the centroid is exact.
    expected = affine[:3, :3] @ centre + affine[:3, 3]
    np.testing.assert_allclose(m.centroid_lps, expected, atol=1e-9)


def test_each_component_is_its_own_lesion_largest_first_and_specks_are_not_lesions() -> None:
    """Issue 13 item 3: two lesions were one "lesion 25.4 mL, 3 components" with the largest's diameter."""
    affine = _oblique_affine((1.0, 1.0, 2.0), (10.0, -20.0, 30.0))
    shape = (70, 50, 24)
    small = _sphere(shape, affine, np.array([20.0, 25.0, 12.0]), 5.0)
    big = _sphere(shape, affine, np.array([55.0, 25.0, 12.0]), 10.0)
    speck = np.zeros(shape, bool)
    speck[2, 2, 2] = True
    assert not (big & small).any()
    labels = (big | small | speck).astype(np.uint8)
    volume = _volume(np.zeros(shape, np.float32), affine)
    voxel_ml = volume.voxel_volume_ml
    found, lesion_map = measure_lesions(labels, volume, ("background", "lesion"), min_volume_ml=2 * voxel_ml)
    assert [(f.tracking_identifier, f.voxel_count) for f in found] == [
        ("lesion 1", int(big.sum())),
        ("lesion 2", int(small.sum())),
    ]
    assert 20.0 - math.sqrt(6) <= found[0].largest_diameter_mm <= 20.0 + 1e-9
    assert 10.0 - math.sqrt(6) <= found[1].largest_diameter_mm <= 10.0 + 1e-9
    for number, (finding, mask) in enumerate(zip(found, (big, small), strict=True), start=1):
        assert finding.volume_ml == pytest.approx(int(mask.sum()) * voxel_ml)
        np.testing.assert_array_equal(lesion_map == number, mask)
        centre = np.argwhere(mask).mean(axis=0)
        np.testing.assert_allclose(finding.centroid_lps, affine[:3, :3] @ centre + affine[:3, 3], atol=1e-6)
    assert lesion_map[2, 2, 2] == 0  # the speck is no lesion
    # Only the declared labels are findings
    assert measure_lesions(labels, volume, ("background", "lesion"), reported=frozenset({"tumour"}))[0] == ()


@pytest.mark.parametrize("backend", ["default", "numpy"])
def test_connected_components_use_26_connectivity(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "numpy":
        monkeypatch.setattr(morphology, "_scipy_ndimage", lambda: None)
    mask = np.zeros((6, 6, 6), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner-touching: one component
    mask[4, 4, 4] = mask[4, 4, 5] = True  # face-touching: another one
    mask[0, 5, 0] = True  # isolated
    labels, n = connected_components(mask)
    assert n == 3
    assert labels[0, 0, 0] == labels[1, 1, 1] != labels[4, 4, 4] == labels[4, 4, 5]
    assert (labels > 0).sum() == 5


def test_numpy_components_match_a_flood_fill_on_random_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(morphology, "_scipy_ndimage", lambda: None)
    rng = np.random.default_rng(7)
    for _ in range(5):
        mask = rng.random((14, 12, 9)) < 0.18
        labels, n = connected_components(mask)
        assert n == _flood_fill_count(mask)
        assert ((labels > 0) == mask).all()


def _flood_fill_count(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            i, j, k = stack.pop()
            for d in np.ndindex(3, 3, 3):
                p = (i + d[0] - 1, j + d[1] - 1, k + d[2] - 1)
                if all(0 <= p[a] < mask.shape[a] for a in range(3)) and mask[p] and not seen[p]:
                    seen[p] = True
                    stack.append(p)
    return count


def test_feret_diameter_equals_brute_force_on_random_blobs() -> None:
    rng = np.random.default_rng(3)
    affine = _oblique_affine((0.7, 1.1, 2.5), (0.0, 0.0, 0.0))
    for _ in range(6):
        mask = rng.random((12, 10, 7)) < 0.3
        xyz = np.argwhere(mask) @ affine[:3, :3].T
        brute = max(np.linalg.norm(xyz - p, axis=1).max() for p in xyz)
        assert max_feret_diameter_mm(mask, affine) == pytest.approx(brute, rel=1e-9)


def test_single_voxel_measures_zero_diameter() -> None:
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    assert max_feret_diameter_mm(mask, np.eye(4)) == 0.0


def test_probability_sum_is_reported_when_probabilities_are_given() -> None:
    affine = np.diag([2.0, 2.0, 2.5, 1.0])  # 10 mm^3 voxels
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 1  # 8 voxels = 0.08 mL
    probs = np.zeros((2, 4, 4, 4), np.float32)
    probs[1] = 0.05
    probs[1][labels == 1] = 0.9
    probs[0] = 1 - probs[1]
    volume = _volume(np.zeros((4, 4, 4), np.float32), affine)

    (m,), _ = measure_lesions(labels, volume, ("background", "lesion"), probabilities=probs)
    # the lesion grown by one voxel: 8 inside, 24 face neighbours (6-neighbourhood of a 2x2x2 cube)
    expected = (8 * 0.9 + 24 * 0.05) * 10 / 1000
    assert m.volume_ml == pytest.approx(0.08)  # the voxels the SEG shows
    assert m.probability_volume_ml == pytest.approx(expected, rel=1e-6)
    assert m.volume(VolumeMethod.PROBABILITY_SUM) == m.probability_volume_ml
    assert m.volume(VolumeMethod.VOXEL_COUNT) == pytest.approx(0.08)


def test_shape_and_name_mismatches_are_refused() -> None:
    volume = _volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="shape"):
        measure_lesions(np.zeros((4, 4, 3), np.uint8), volume, ("background", "lesion"))
    with pytest.raises(ValueError, match="no name"):
        measure_lesions(np.full((4, 4, 4), 2, np.uint8), volume, ("background", "lesion"))


def test_finding_carries_snomed_codes() -> None:
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[3:5, 3:5, 3:5] = 2
    volume = _volume(np.zeros((5, 5, 5), np.float32), np.eye(4))
    spleen, lesion = measure_lesions(labels, volume, ("background", "spleen", "lesion"))[0]
    assert spleen.type is not None and spleen.type.value == "78961009"
    assert lesion.category == MORPHOLOGICALLY_ABNORMAL_STRUCTURE and lesion.type == LESION


def test_label_map() -> None:
    assert segment_codes("Spleen") == segment_codes("spleen")
    kidney = segment_codes("kidney_right")
    assert kidney is not None and kidney.type.value == "9846003"
    liver_lesion = segment_codes("liver-lesion")
    assert liver_lesion is not None and liver_lesion.type == LESION
    assert liver_lesion.finding_site is not None and liver_lesion.finding_site.value == "10200004"
    assert segment_codes("vertebrae_L5") is None
    assert is_background("_background_") and not is_background("lesion")


def _finding(name: str, volume_ml: float) -> Finding:
    return Finding(
        label=1, name=name, volume_ml=volume_ml, largest_diameter_mm=10.0, centroid_lps=(0.0, 0.0, 0.0)
    )


def test_triage_levels_and_summary() -> None:
    thresholds = PriorityThresholds(
        urgent_volume_ml=5.0, critical_volume_ml=50.0, urgent_probability=0.5, critical_probability=0.9
    )
    assert triage([_finding("lesion", 1.0)], [], thresholds) == (Priority.ROUTINE, "")
    priority, reason = triage([_finding("lesion", 5.0)], [], thresholds)
    assert priority is Priority.URGENT and "lesion 5 mL >= urgent" in reason
    # the lesion burden counts: two lesions of 3 mL are 6 mL of lesion
    assert triage([_finding("lesion", 3.0), _finding("lesion", 3.0)], [], thresholds)[0] is Priority.URGENT
    assert triage([_finding("lesion", 60.0)], [], thresholds)[0] is Priority.STAT
    assert triage([], [Classification("lesion", 0.95)], thresholds)[0] is Priority.STAT
    assert triage([], [Classification("lesion", 0.6)], thresholds)[0] is Priority.URGENT

    only_lesion = PriorityThresholds(urgent_volume_ml=5.0, labels=frozenset({"lesion"}))
    assert triage([_finding("spleen", 300.0)], [], only_lesion)[0] is Priority.ROUTINE

    line = summary_line(Priority.URGENT, reason, [_finding("lesion", 5.0)], [Classification("lesion", 0.6)])
    assert line.startswith("URGENT (lesion 5 mL")
    assert "lesion 1 5 mL, largest diameter 10 mm" in line and "P(lesion) 0.60" in line
    assert summary_line(Priority.ROUTINE, "", [], []) == "ROUTINE: nothing segmented"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"urgent_volume_ml": -1.0},
        {"urgent_probability": 1.5},
        {"urgent_volume_ml": 10.0, "critical_volume_ml": 5.0},
        {"urgent_probability": 0.8, "critical_probability": 0.5},
        {"critical_volume_ml": float("nan")},
    ],
)
def test_thresholds_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="PriorityThresholds"):
        PriorityThresholds(**kwargs)


def test_findings_from_a_segmentation_prediction() -> None:
    from pipeline.bundle_runtime import BundleKind, Prediction

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[2:12, 2:12, 2:8] = 1  # 600 voxels = 0.6 mL
    algorithm = AlgorithmInfo("demo", "1.0", "0" * 64, "triage")
    prediction = Prediction(
        kind=BundleKind.SEGMENTATION, label_names=("background", "lesion"), algorithm=algorithm, labels=labels
    )
    volume = _volume(np.zeros(labels.shape, np.float32), affine)
    measured = findings_from_prediction(prediction, volume, PriorityThresholds(urgent_volume_ml=0.5))
    findings = measured.findings
    (finding,) = findings.findings
    assert measured.lesion_map is not None and int(measured.lesion_map.sum()) == 600
    assert finding.volume_ml == pytest.approx(0.6)
    assert findings.priority is Priority.URGENT and findings.algorithm == algorithm
    assert findings.summary.startswith("URGENT (lesion 0.6 mL")
    np.testing.assert_allclose(finding.centroid_lps, (6.5, 6.5, 4.5))


def test_many_specks_are_each_measured_as_an_independent_computation_measures_them() -> None:
    """Each component in its own box (issue 15: hundreds of specks cost a full scan each) changes nothing.

    Reference, written independently: every component of the whole label mask, its voxels, the
    voxel-centre mean, and the probability over it grown by one voxel minus other lesions' voxels.
    """
    rng = np.random.default_rng(7)
    labels = np.zeros((40, 36, 12), np.uint8)
    labels[rng.random(labels.shape) < 0.04] = 1
    labels[rng.random(labels.shape) < 0.02] = 2
    labels[5:12, 6:14, 2:7] = 1  # one big lesion among the specks
    probs = rng.random((3, *labels.shape)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 30.0)
    volume = _volume(np.zeros(labels.shape, np.float32), affine)
    voxel_ml = 0.8 * 0.8 * 2.5 / 1000

    found, lesion_map = measure_lesions(labels, volume, ("background", "a", "b"), probabilities=probs)

    expected = []
    for label in (1, 2):
        components, n = connected_components(labels == label)
        for c in range(1, n + 1):
            mask = components == c
            grown = mask.copy()
            for axis in range(3):
                grown |= np.roll(mask, 1, axis) & (np.arange(labels.shape[axis]) > 0).reshape(
                    [-1 if a == axis else 1 for a in range(3)]
                )
                grown |= np.roll(mask, -1, axis) & (
                    np.arange(labels.shape[axis]) < labels.shape[axis] - 1
                ).reshape([-1 if a == axis else 1 for a in range(3)])
            region = grown & ((labels == 0) | mask)
            centre = affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0)
            expected.append(
                (
                    label,
                    int(mask.sum()),
                    tuple(centre[:3]),
                    float(probs[label][region].sum()) * voxel_ml,
                    mask,
                )
            )
    assert len(found) == len(expected) > 100
    by_centre = {(e[0], e[1], tuple(np.round(e[2], 6))): e for e in expected}
    for n, f in enumerate(found, start=1):
        label, count, _, prob_ml, mask = by_centre[
            (f.label, f.voxel_count, tuple(np.round(f.centroid_lps, 6)))
        ]
        assert f.volume_ml == pytest.approx(count * voxel_ml)
        assert f.probability_volume_ml == pytest.approx(prob_ml, rel=1e-5)
        assert np.array_equal(lesion_map == n, mask)
