"""The demo segmentation bundle's sliding window holds a whole lesion (issue 13 item 8).

The network's output fades near the edge of a window. With 96 x 96 x 32 windows overlapping by 0.25,
a voxel could lie 15 mm in-plane and 10 mm in z from the nearest cut in every window that covers it,
so a lesion cut by a window edge came out too small (seed 5, two lesions: 16.3 mL measured 6.1 mL).
The committed ``inference.json`` must give every voxel a window in which the largest demo lesion
fits around it without being cut. This fast check failed with the old windows; the slow sweep in
``tests/e2e/test_demo_volume_sweep.py`` measures the effect end to end.
"""

from __future__ import annotations

import json
import math

import numpy as np
from monai.data.utils import dense_patch_slices

from pipeline.demo.bundle import DEMO_BUNDLE_DIR
from pipeline.demo.bundle_configs import SEG_SPACING, seg_config
from pipeline.demo.phantom import PhantomOptions


def _largest_semi_axis_mm() -> float:
    """The longest semi-axis a default demo lesion can have (``phantom._place_lesions``: stretch 0.8-1.25)."""
    radius = (3 * PhantomOptions().lesion_volume_ml[1] * 1000 / (4 * math.pi)) ** (1 / 3)
    return radius / (0.8 * 0.8)


def _worst_margin(size: int, roi: int, overlap: float) -> int:
    """Over the voxels of one axis of ``size``: the least, over voxels, of the best distance (voxels) to a
    window edge that cuts the image (an edge at the image's own border cuts nothing)."""
    roi = min(roi, size)
    interval = max(int(roi * (1 - overlap)), 1)  # as monai.inferers.utils._get_scan_interval
    starts = sorted({s[0].start for s in dense_patch_slices((size,), (roi,), (interval,))})
    best = np.zeros(size)
    v = np.arange(size)
    for s in starts:
        low = v - s if s > 0 else np.full(size, np.inf)
        high = s + roi - 1 - v if s + roi < size else np.full(size, np.inf)
        inside = (v >= s) & (v < s + roi)
        best = np.maximum(best, np.where(inside, np.minimum(low, high), 0))
    return int(best.min())


def test_the_committed_config_is_the_generated_one() -> None:
    committed = json.loads((DEMO_BUNDLE_DIR / "lesion_seg" / "configs" / "inference.json").read_text())
    assert committed == json.loads(json.dumps(seg_config()))


def test_every_voxel_has_a_window_that_holds_the_largest_lesion() -> None:
    inferer = json.loads((DEMO_BUNDLE_DIR / "lesion_seg" / "configs" / "inference.json").read_text())[
        "inferer"
    ]
    need_mm = _largest_semi_axis_mm()
    assert 29 < need_mm < 31  # 30 mL, stretched
    for axis, (roi, spacing) in enumerate(zip(inferer["roi_size"], SEG_SPACING, strict=True)):
        for size in range(roi + 1, 480 if axis < 2 else 400):  # grids of 64 to 1000 slices of 2.5 mm
            margin_mm = _worst_margin(size, roi, inferer["overlap"]) * spacing
            assert margin_mm >= need_mm, (
                f"axis {axis}, {size} voxels: a voxel is at most {margin_mm:.1f} mm from a window edge, "
                f"a lesion has semi-axes up to {need_mm:.1f} mm"
            )


def test_the_margin_check_sees_the_old_windows() -> None:
    """96 x 96 x 32 with overlap 0.25 (before issue 13 item 8): 15 mm in-plane, 10 mm in z."""
    assert _worst_margin(317, 96, 0.25) * SEG_SPACING[0] <= 15.0
    assert _worst_margin(64, 32, 0.25) * SEG_SPACING[2] <= 10.0
