"""Multi-series geometry (issue 14 review): a channel of another orientation lands on the reference grid.

The reference channel is an axial CT phantom, the other a copy of the real sagittal MR of testdata,
both re-tagged into one study and one Frame of Reference, the axial block placed inside the MR's field
of view. What :func:`pipeline.multiseries.stack_channels` makes of the sagittal series (MONAI
``ResampleToMatch`` on the two LPS affines) must equal an independent trilinear interpolation
(``scipy.ndimage.map_coordinates``, order 1) of the sagittal voxels at the reference voxel centres,
mapped through the DICOM-derived affines: a flipped or permuted axis would be tens of mm off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from scipy import ndimage

from pipeline.demo.phantom import PhantomOptions, write_phantom_series
from pipeline.geometry import load_volume
from pipeline.multiseries import Channel, MultiSeriesInput, select_channels, stack_channels
from pipeline.orientation import Orientation
from pipeline.series_select import SelectionRule
from tests.paths import TESTDATA

SAGITTAL = TESTDATA / "mr_series" / "sag_t1_fl2d_HFS"


def _retag(paths: list[Path], study: str, frame: str, shift: np.ndarray | None = None) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.FrameOfReferenceUID = frame
        if shift is not None:
            ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + shift]
        ds.save_as(path, enforce_file_format=True)


def test_a_sagittal_channel_is_resampled_onto_an_axial_reference(tmp_path: Path) -> None:
    axial_dir, sag_dir = tmp_path / "axial", tmp_path / "sagittal"
    write_phantom_series(
        axial_dir, seed=3, lesions=0, slices=12, options=PhantomOptions(matrix=64, pixel_spacing_mm=0.8)
    )
    axial = sorted(axial_dir.glob("*.dcm"))
    sag_dir.mkdir()
    sagittal = []
    for source in sorted(SAGITTAL.glob("*.dcm")):
        target = sag_dir / source.name
        target.write_bytes(source.read_bytes())
        sagittal.append(target)
    study, frame = generate_uid(), generate_uid()
    first = min(
        (np.asarray(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient, float) for p in axial),
        key=lambda v: v[2],
    )
    _retag(axial, study, frame, shift=np.array([-20.0, -30.0, -15.0]) - first)  # inside the MR's view
    _retag(sagittal, study, frame)

    any_plane = frozenset(Orientation)
    inputs = MultiSeriesInput(
        channels=(
            Channel(name="CT", rule=SelectionRule(modalities=frozenset({"CT"}), orientations=any_plane)),
            Channel(name="MR", rule=SelectionRule(modalities=frozenset({"MR"}), orientations=any_plane)),
        )
    )
    stacked = stack_channels(select_channels(axial + sagittal, inputs), inputs)

    reference, mr = load_volume(axial), load_volume(sagittal)
    assert np.allclose(stacked.affine, reference.affine)
    np.testing.assert_array_equal(stacked.channels[0], reference.array)
    # Independent: each reference voxel centre through the reference affine to LPS, back through the
    # sagittal affine to its voxel indices, trilinear there.
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in reference.array.shape), indexing="ij"), axis=-1)
    lps = ijk @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    src = (lps - mr.affine[:3, 3]) @ np.linalg.inv(mr.affine[:3, :3]).T
    expected = ndimage.map_coordinates(mr.array, np.moveaxis(src, -1, 0), order=1, mode="constant", cval=0.0)
    inside = np.all((src >= 0) & (src <= np.array(mr.array.shape) - 1), axis=-1)
    assert inside.mean() > 0.9  # the axial block lies within the sagittal field of view
    scale = float(np.abs(mr.array).max())
    np.testing.assert_allclose(stacked.channels[1][inside], expected[inside], atol=1e-3 * scale)
    assert float(np.abs(expected[inside]).max()) > 0.1 * scale  # not a comparison of zeros
