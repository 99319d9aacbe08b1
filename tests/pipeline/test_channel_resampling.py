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
import pytest
from pydicom.uid import generate_uid
from scipy import ndimage

from pipeline.demo.phantom import PhantomOptions, write_phantom_series
from pipeline.errors import GeometryError
from pipeline.geometry import load_volume
from pipeline.multiseries import Channel, MultiSeriesInput, coverage, select_channels, stack_channels
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


ANY_PLANE = frozenset(Orientation)
INPUTS = MultiSeriesInput(
    channels=(
        Channel(name="CT", rule=SelectionRule(modalities=frozenset({"CT"}), orientations=ANY_PLANE)),
        Channel(name="MR", rule=SelectionRule(modalities=frozenset({"MR"}), orientations=ANY_PLANE)),
    )
)


def _study(tmp_path: Path, offset_mm: tuple[float, float, float]) -> tuple[list[Path], list[Path]]:
    """An axial CT block (its first slice's corner at ``offset_mm``, LPS) and the sagittal MR, one study."""
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
    _retag(axial, study, frame, shift=np.array(offset_mm) - first)
    _retag(sagittal, study, frame)
    return axial, sagittal


def test_a_sagittal_channel_is_resampled_onto_an_axial_reference(tmp_path: Path) -> None:
    axial, sagittal = _study(tmp_path, (-20.0, -30.0, -15.0))  # inside the MR's view
    inputs = INPUTS
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
    assert not any("covers" in note for note in stacked.warnings)


def test_a_channel_that_does_not_cover_the_reference_is_refused_and_a_partial_one_noted(
    tmp_path: Path,
) -> None:
    """Declared registered or not, a channel whose field of view misses the reference grid would reach
    the network as zeros: refused with the coverage named; a partly covering one is noted."""
    axial, sagittal = _study(tmp_path / "far", (400.0, 400.0, 400.0))  # far outside the MR's view
    with pytest.raises(GeometryError, match=r"channel 'MR', series .* covers 0% of the reference grid"):
        stack_channels(select_channels(axial + sagittal, INPUTS), INPUTS)

    mr = load_volume(sorted(SAGITTAL.glob("*.dcm")))
    corners = np.array(np.meshgrid(*([0, n - 1] for n in mr.array.shape), indexing="ij")).reshape(3, -1).T
    x_max = float((corners @ mr.affine[:3, :3].T + mr.affine[:3, 3])[:, 0].max())
    # The block (64 x 0.8 mm wide in x from its corner) straddles the MR's last plane in x: part in, part out.
    axial, sagittal = _study(tmp_path / "part", (x_max - 35.0, -30.0, -15.0))
    partial = coverage(load_volume(sagittal), load_volume(axial))
    assert 0.05 < partial < 0.95
    stacked = stack_channels(select_channels(axial + sagittal, INPUTS), INPUTS)
    assert any(f"covers {partial:.0%} of that grid, zero outside" in note for note in stacked.warnings)
