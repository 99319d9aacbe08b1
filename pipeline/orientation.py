"""The anatomical plane of a series: the closed value set that selection rules and the config use.

Kept apart from :mod:`pipeline.series_select` (which tells the plane from ImageOrientationPatient)
so that the configuration can name planes without importing NumPy and pydicom.
"""

from __future__ import annotations

import enum

__all__ = ["ORIENTATIONS", "Orientation"]


class Orientation(enum.StrEnum):
    """Plane of a series, from the dominant LPS axis of its slice normal (PS3.3 C.7.6.2.1.1)."""

    AXIAL = "axial"  # normal along z (foot-head)
    CORONAL = "coronal"  # normal along y (anterior-posterior)
    SAGITTAL = "sagittal"  # normal along x (right-left)
    OBLIQUE = "oblique"  # normal further than the allowed angle from every axis


ORIENTATIONS: frozenset[Orientation] = frozenset(Orientation)
