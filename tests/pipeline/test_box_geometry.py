"""Geometry of detection boxes off the axial plane (issue 14 review): independent numpy answers.

- the key image of a box on a sagittal series outlines the box's cross-section in that slice's plane
  (its A-P and H-F extent), not a band over the whole slice height;
"""

from __future__ import annotations

import numpy as np

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
