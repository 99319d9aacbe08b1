"""Geometry of detection boxes off the axial plane (issue 14 review): independent numpy answers.

- the key image of a box on a sagittal series outlines the box's cross-section in that slice's plane
  (its A-P and H-F extent), not a band over the whole slice height;
- a box found on an oblique grid is reported in LPS as the bounding box of all eight of its corners,
  whatever the bundle's ``affine_lps_to_ras``, so the SR's ellipsoid and extents contain the detection.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.detection import boxes_lps
from pipeline.findings import Detection
from pipeline.volume import InstanceRef, Volume
from pipeline.writers.key_images import box_mask


def _volume(affine: np.ndarray, shape: tuple[int, int, int]) -> Volume:
    return Volume(
        array=np.zeros(shape, dtype=np.float32),
        affine=affine,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        frame_of_reference_uid="1.2.3.5",
        modality="CT",
        source_instances=tuple(
            InstanceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.6.{n}") for n in range(shape[2])
        ),
    )


def test_key_image_mask_of_a_box_on_a_sagittal_series_is_its_cross_section() -> None:
    # Sagittal, 1 mm: i (along a row) towards P, j (down a column) towards the feet, k towards L.
    affine = np.array([[0, 0, 1.0, -10], [1.0, 0, 0, -30], [0, -1.0, 0, 30], [0, 0, 0, 1]])
    volume = _volume(affine, (60, 60, 20))
    box = Detection(label=0, name="nodule", score=0.9, box_lps=(-2.0, -5.2, -4.2, 4.0, 5.2, 6.2))
    k, mask = box_mask(box, volume)
    # Independent: the slice nearest the box centre's x (k = x + 10), and the pixels of that slice whose
    # y = i - 30 and z = 30 - j lie in the box: i in 25..35, j in 24..34.
    assert k == 11
    expected = np.zeros((60, 60), dtype=bool)
    expected[25:36, 24:35] = True
    np.testing.assert_array_equal(mask, expected)


def test_key_image_mask_of_an_axial_box_is_unchanged() -> None:
    affine = np.array([[0.5, 0, 0, -10], [0, 0.5, 0, -10], [0, 0, 2.0, -20], [0, 0, 0, 1]])
    volume = _volume(affine, (40, 40, 20))
    box = Detection(label=0, name="nodule", score=0.9, box_lps=(-3.1, 0.2, -1.0, 2.1, 4.9, 3.0))
    k, mask = box_mask(box, volume)
    assert k == 10  # z centre 1.0 -> k = (1 + 20) / 2 = 10.5, rounded to even
    expected = np.zeros((40, 40), dtype=bool)
    expected[14:25, 21:30] = True  # x = 0.5 i - 10 in [-3.1, 2.1]; y = 0.5 j - 10 in [0.2, 4.9]
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("lps_to_ras", [True, False])
def test_a_box_on_an_oblique_grid_is_the_bounding_box_of_its_eight_corners(lps_to_ras: bool) -> None:
    from monai.apps.detection.transforms.dictionary import AffineBoxToWorldCoordinated, ConvertBoxModed
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    # The preprocessed image's grid: rotated 45 degrees about the head-foot axis, 0.7 x 0.7 x 1.25 mm.
    t = np.deg2rad(45.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag(
        [0.7, 0.7, 1.25]
    )
    affine[:3, 3] = [-30.0, 12.0, -100.0]
    image = MetaTensor(
        torch.zeros((1, 64, 64, 32)), affine=torch.as_tensor(affine), meta={MetaKeys.SPACE: SpaceKeys.LPS}
    )
    voxel_box = np.array([20.0, 24.0, 5.0, 34.0, 38.0, 11.0])  # xyzxyz in voxels: 14 x 14 x 6
    steps = [
        AffineBoxToWorldCoordinated(box_keys="box", box_ref_image_keys="image", affine_lps_to_ras=lps_to_ras),
        ConvertBoxModed(box_keys="box", src_mode="xyzxyz", dst_mode="cccwhd"),
    ]
    item = {"box": torch.as_tensor(voxel_box[None]), "image": image}
    _, corners = boxes_lps(item, steps, "image")
    # Independent: every corner of the voxel box through the LPS affine, their bounding box.
    points = np.array(
        [
            affine @ [c[0], c[1], c[2], 1.0]
            for c in itertools.product(*zip(voxel_box[:3], voxel_box[3:], strict=True))
        ]
    )[:, :3]
    expected = np.concatenate([points.min(axis=0), points.max(axis=0)])
    np.testing.assert_allclose(corners[0], expected, atol=1e-6)
    # 14 voxels of 0.7 mm at 45 degrees span 9.8 * sqrt(2) = 13.9 mm along x and y
    np.testing.assert_allclose(corners[0, 3:5] - corners[0, :2], [9.8 * np.sqrt(2)] * 2, atol=1e-6)
