"""The volume value object: voxels plus the geometry that places them in the patient.

Conventions (stated once, used everywhere):
- ``array`` is indexed ``[i, j, k]``: ``i`` = column index within a slice (moves along the row
  direction cosine, DICOM ImageOrientationPatient[0:3]), ``j`` = row index (moves along the
  column direction cosine, IOP[3:6]), ``k`` = slice index along the slice normal (row x column),
  ascending. This is the NIfTI/ITK/MONAI order, so the array feeds a MetaTensor unchanged.
- ``affine`` maps ``(i, j, k, 1)`` to **LPS** patient coordinates in mm (DICOM PS3.3 C.7.6.2.1.1,
  the DICOM patient coordinate system). Column ``0`` is row-direction cosine x PixelSpacing[1]
  (column spacing), column ``1`` is column-direction cosine x PixelSpacing[0] (row spacing):
  PixelSpacing is [row spacing, column spacing].
- ``source_instances[k]`` is the SOP instance (and frame, for multi-frame) that slice ``k`` came from.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage

COORDINATE_SPACE = "LPS"


@dataclass(frozen=True)
class InstanceRef:
    """One source image (or one frame of a multi-frame image) that contributed a slice."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  # 1-based, only for multi-frame instances


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D image with trustworthy geometry in the DICOM (LPS) patient coordinate system."""

    array: np.ndarray
    affine: np.ndarray
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    source_instances: tuple[InstanceRef, ...]
    space: str = field(default=COORDINATE_SPACE)
    warnings: tuple[str, ...] = ()  # what was assumed to build it (the job records them)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3-D [i, j, k], got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {self.affine.shape}")
        if len(self.source_instances) != self.array.shape[2]:
            raise ValueError(
                f"Volume has {self.array.shape[2]} slices but {len(self.source_instances)} "
                "source instances; there must be one per slice"
            )
        if self.space != COORDINATE_SPACE:
            raise ValueError(f"Volume.space must be {COORDINATE_SPACE!r}, got {self.space!r}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def index_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices (N x 3, may be fractional) to LPS patient coordinates in mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def _derived_uid(seed: str, part: str) -> str:
    """A deterministic UUID-derived UID (PS3.5 B.2, root 2.25) for synthetic volumes."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'{seed}/{part}').int}"


def volume_from_array(
    array: np.ndarray, affine: np.ndarray, *, modality: str = "OT", uid_seed: str = "synthetic"
) -> Volume:
    """A Volume from an ``[i, j, k]`` array and an LPS affine (phantoms, tests), with derived UIDs."""
    arr = np.asarray(array)
    aff = np.asarray(affine, dtype=float)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or not np.allclose(aff[3], [0, 0, 0, 1]):
        raise ValueError(f"affine must be a finite 4x4 with last row [0, 0, 0, 1], got {aff.tolist()}")
    if arr.ndim != 3:
        raise ValueError(f"array must be 3-D [i, j, k], got shape {arr.shape}")
    if abs(float(np.linalg.det(aff[:3, :3]))) < 1e-12:
        raise ValueError("affine is singular: its i, j, k columns do not span space")
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, SecondaryCaptureImageStorage)
    series = _derived_uid(uid_seed, "series")
    return Volume(
        array=arr,
        affine=aff,
        study_instance_uid=_derived_uid(uid_seed, "study"),
        series_instance_uid=series,
        frame_of_reference_uid=_derived_uid(uid_seed, "frame-of-reference"),
        modality=modality,
        source_instances=tuple(
            InstanceRef(sop_class, _derived_uid(uid_seed, f"instance/{k}")) for k in range(arr.shape[2])
        ),
    )
