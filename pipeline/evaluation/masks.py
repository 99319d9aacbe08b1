"""True and predicted masks on the grid of the analysed series: from a DICOM SEG or a NIfTI file.

The series grid is :class:`~pipeline.volume.Volume`'s: array ``[i, j, k]``, affine to LPS mm. NIfTI
affines are RAS (nibabel), so ``diag(-1, -1, 1, 1)`` converts between the two. A NIfTI mask must lie
on the series grid up to a permutation or flip of its axes (what any converter writes); anything else
is refused with a ValueError that says so, rather than resampled silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipeline.volume import Volume

__all__ = ["LPS_TO_RAS", "mask_from_nifti", "mask_from_seg", "write_nifti_mask"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TOLERANCE = 1e-3


def write_nifti_mask(path: str | Path, label: np.ndarray, affine_lps: np.ndarray) -> None:
    """Write a label map ``[i, j, k]`` with its LPS affine as NIfTI-1 (``.nii`` or ``.nii.gz``)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), LPS_TO_RAS @ np.asarray(affine_lps, float))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, str(path))


def mask_from_nifti(path: str | Path, volume: Volume) -> np.ndarray:
    """The NIfTI label map at ``path`` on ``volume``'s grid (uint8/16 labels, 0 background)."""
    import nibabel as nib

    image: Any = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: a mask must be 3-D, got shape {data.shape}")
    truth_lps = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
    # series voxel -> truth voxel; must be a signed permutation with an integer offset
    mapping = np.linalg.inv(truth_lps) @ np.asarray(volume.affine, float)
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    rounded = np.round(linear)
    permutation = np.abs(rounded).sum(axis=0)
    if (
        np.abs(linear - rounded).max() > _TOLERANCE
        or not np.all(permutation == 1)
        or not np.all(np.abs(rounded).sum(axis=1) == 1)
        or np.abs(offset - np.round(offset)).max() > _TOLERANCE
    ):
        raise ValueError(
            f"{path}: the mask is not on the grid of series {volume.series_instance_uid} (its affine differs "
            "by more than an axis permutation or flip); resample it onto the series first"
        )
    shape = volume.array.shape
    index = [np.zeros(0)] * 3
    for axis in range(3):  # series axis `axis` runs along truth axis `source`
        source = int(np.nonzero(rounded[:, axis])[0][0])
        index[axis] = rounded[source, axis] * np.arange(shape[axis]) + round(float(offset[source]))
    order = [int(np.nonzero(rounded[:, a])[0][0]) for a in range(3)]
    out = np.zeros(shape, dtype=data.dtype if data.dtype.kind in "iu" else np.uint8)
    valid = [(ix >= 0) & (ix < data.shape[order[a]]) for a, ix in enumerate(index)]
    if not all(v.any() for v in valid):
        raise ValueError(f"{path}: the mask does not overlap series {volume.series_instance_uid}")
    moved = np.transpose(data, order)  # now indexed by series axes, in the truth's own steps
    picked = moved[np.ix_(*(ix[v].astype(int) for ix, v in zip(index, valid, strict=True)))]
    out[np.ix_(*(np.nonzero(v)[0] for v in valid))] = np.rint(picked).astype(out.dtype)
    return out


def mask_from_seg(seg: Dataset, volume: Volume) -> np.ndarray:
    """The segments of a DICOM SEG on ``volume``'s grid: voxel = segment number (the last one wins).

    Frames are placed by their referenced source instance, else by their plane position.
    """
    shape: tuple[int, ...] = tuple(volume.array.shape)
    label = np.zeros(shape, dtype=np.uint16)
    if int(getattr(seg, "NumberOfFrames", 0) or 0) == 0:
        return label
    pixels = np.asarray(seg.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    slice_of = {ref.sop_instance_uid: k for k, ref in enumerate(volume.source_instances)}
    normal = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    origin = volume.affine[:3, 3]
    step = float(np.linalg.norm(volume.affine[:3, 2]))
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=False):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = None
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                k = slice_of.get(str(source.ReferencedSOPInstanceUID), k)
        if k is None and "PlanePositionSequence" in item:
            position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
            k = round(float(np.dot(position - origin, normal)) / step)
        if k is None or not 0 <= k < shape[2]:
            raise ValueError(
                f"SEG {seg.SOPInstanceUID}: a frame of segment {segment} is on no slice of the series"
            )
        plane = np.asarray(frame).T  # rows x columns -> [i, j]
        if plane.shape != shape[:2]:
            raise ValueError(f"SEG {seg.SOPInstanceUID}: frames of {plane.shape} on a grid of {shape[:2]}")
        label[:, :, k][plane > 0] = segment
    return label
