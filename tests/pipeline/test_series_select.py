"""Series selection: rules, deterministic choice, and reasons, on real files and synthetic series."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import SecondaryCaptureImageStorage

from pipeline.errors import NoUsableSeries
from pipeline.series_select import SelectedSeries, SelectionRule, orientation_of, select_series
from tests.paths import TESTDATA
from tests.pipeline.test_geometry import write_series, write_slice

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
TILT = sorted((TESTDATA / "ct_series" / "gantry_tilt").glob("GE_*.dcm"))
SAGITTAL = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))
ABDOMEN_UID = "1.2.826.0.1.3680043.8.498.32088812841005981500806250333457147817"
SAGITTAL_UID = "1.3.12.2.1107.5.2.43.67060.2022040715044210837860713.0.0.0"
CT_AXIAL = SelectionRule(modalities=frozenset({"CT"}))


def _stack(n: int, spacing: float = 1.0) -> list[tuple[float, float, float]]:
    return [(0.0, 0.0, spacing * s) for s in range(n)]


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ((1, 0, 0, 0, 1, 0), "axial"),
        ((-1, 0, 0, 0, 1, 0), "axial"),
        ((1, 0, 0, 0, 0, -1), "coronal"),
        ((0, 1, 0, 0, 0, -1), "sagittal"),
        ((1, 0, 0, 0, 0.9483237, -0.3173047), "axial"),  # the 18.5 deg gantry tilt of GE_*.dcm
        ((1, 0, 0, 0, math.cos(math.radians(45)), -math.sin(math.radians(45))), "oblique"),
        ((0.99415, 0.1, 0, -0.1, 0.99415, -0.108), "axial"),
    ],
)
def test_orientation_of_uses_the_dominant_axis_of_the_normal(iop: tuple[float, ...], expected: str) -> None:
    assert orientation_of(iop) == expected


@settings(max_examples=50, deadline=None)
@given(
    axis=st.sampled_from([0, 1, 2]),
    tilt=st.floats(-29.0, 29.0),
    spin=st.floats(0.0, 360.0),
)
def test_orientation_is_the_plane_within_30_degrees(axis: int, tilt: float, spin: float) -> None:
    # A normal within 29 deg of an axis, with the in-plane directions spun arbitrarily around it.
    t, p = math.radians(tilt), math.radians(spin)
    local_normal = np.array([math.sin(t), 0.0, math.cos(t)])
    helper = np.array([0.0, 1.0, 0.0])
    row = np.cross(helper, local_normal)
    row /= np.linalg.norm(row)
    col = np.cross(local_normal, row)
    row, col = math.cos(p) * row + math.sin(p) * col, -math.sin(p) * row + math.cos(p) * col
    perm = {2: [0, 1, 2], 1: [1, 2, 0], 0: [2, 0, 1]}[axis]  # cyclic: local z lands on the chosen axis
    row, col = row[perm], col[perm]
    assert orientation_of([*row, *col]) == ("sagittal", "coronal", "axial")[axis]


def test_selection_rule_validates_itself() -> None:
    with pytest.raises(ValueError, match="modalities"):
        SelectionRule(modalities=frozenset())
    with pytest.raises(ValueError, match="upper-case"):
        SelectionRule(modalities=frozenset({"ct"}))
    with pytest.raises(ValueError, match="orientations"):
        SelectionRule(modalities=frozenset({"CT"}), orientations=frozenset({"transverse"}))
    with pytest.raises(ValueError, match="min_slices"):
        SelectionRule(modalities=frozenset({"CT"}), min_slices=0)
    with pytest.raises(ValueError, match="slice_thickness_mm"):
        SelectionRule(modalities=frozenset({"CT"}), slice_thickness_mm=(5.0, 1.0))


def test_real_study_picks_the_ct_and_says_why() -> None:
    study = [*ABDOMEN, *SAGITTAL, *(TESTDATA / "transfer_syntaxes").glob("sc_rgb_*.dcm")]
    chosen = select_series(study, CT_AXIAL)
    assert isinstance(chosen, SelectedSeries)
    assert chosen.series_instance_uid == ABDOMEN_UID
    assert sorted(chosen.paths) == ABDOMEN
    assert (chosen.modality, chosen.orientation, chosen.n_slices) == ("CT", "axial", 20)
    assert chosen.slice_thickness_mm == 3.0 and chosen.series_number == 3
    assert "CT Body 3.0" in chosen.reason and "20 slices" in chosen.reason
    rejected = dict(chosen.rejected)
    assert rejected[SAGITTAL_UID] == "Modality MR not in ['CT']"
    assert len(rejected) == 2  # MR and the secondary-capture family


def test_thickness_range_decides_between_real_ct_series() -> None:
    # The gantry-tilt head CT has more slices (28), so it wins on count alone...
    assert select_series([*ABDOMEN, *TILT], CT_AXIAL).paths == tuple(TILT)
    # ...but its 4 and 7 mm slices are outside a 0.5-3.5 mm rule.
    rule = SelectionRule(modalities=frozenset({"CT"}), slice_thickness_mm=(0.5, 3.5))
    chosen = select_series([*ABDOMEN, *TILT], rule)
    assert chosen.series_instance_uid == ABDOMEN_UID
    assert "SliceThickness ['4', '7'] mm outside 0.5-3.5 mm" in dict(chosen.rejected).values()


def test_no_usable_series_lists_every_series_and_reason() -> None:
    rule = SelectionRule(modalities=frozenset({"MR"}), orientations=frozenset({"axial"}), min_slices=10)
    study = [*ABDOMEN, *SAGITTAL, TESTDATA / "malformed" / "10_not_dicom.dcm"]
    with pytest.raises(NoUsableSeries) as err:
        select_series(study, rule)
    message = str(err.value)
    assert "Modality in ['MR'], orientation in ['axial'], >= 10 slices" in message
    assert f"series {ABDOMEN_UID} (#3 'CT Body 3.0' 20 files): Modality CT not in ['MR']" in message
    assert (
        f"series {SAGITTAL_UID} (#3 't1_fl2d_sag' 16 files): orientation sagittal not in ['axial']" in message
    )
    assert "1 unreadable file(s), e.g. 10_not_dicom.dcm: not a DICOM file" in message


def test_empty_study_is_no_usable_series() -> None:
    with pytest.raises(NoUsableSeries, match="the study has no files"):
        select_series([], CT_AXIAL)


def test_multi_phase_series_is_rejected() -> None:
    files = sorted((TESTDATA / "enhanced_multiframe").glob("siemens_xa10_enhMR_6_*.dcm"))
    with pytest.raises(NoUsableSeries, match=r"24 images at only 6 distinct positions"):
        select_series(files, SelectionRule(modalities=frozenset({"MR"})))


def test_localizer_screen_capture_and_few_slices_are_skipped(tmp_path: Path) -> None:
    localizer = write_series(
        tmp_path,
        _stack(40),
        prefix="loc",
        series_uid="1.2.826.0.1.3680043.10.7.1",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        series_number=1,
    )
    screen = write_series(
        tmp_path,
        _stack(30),
        prefix="sc",
        series_uid="1.2.826.0.1.3680043.10.7.2",
        sop_class=SecondaryCaptureImageStorage,
        image_type=("DERIVED", "SECONDARY", "SCREEN SAVE"),
        series_number=999,
    )
    short = write_series(tmp_path, _stack(5), prefix="short", series_uid="1.2.826.0.1.3680043.10.7.3")
    good = write_series(tmp_path, _stack(12), prefix="good", series_uid="1.2.826.0.1.3680043.10.7.4")
    rule = SelectionRule(modalities=frozenset({"CT"}), min_slices=10)
    chosen = select_series([*localizer, *screen, *short, *good], rule)
    assert chosen.series_instance_uid == "1.2.826.0.1.3680043.10.7.4"
    rejected = dict(chosen.rejected)
    assert rejected["1.2.826.0.1.3680043.10.7.1"] == "localizer: ImageType ORIGINAL\\PRIMARY\\LOCALIZER"
    assert "Secondary Capture Image Storage" in rejected["1.2.826.0.1.3680043.10.7.2"]
    assert rejected["1.2.826.0.1.3680043.10.7.3"] == "5 slices, fewer than 10"


def test_original_primary_is_preferred_over_more_derived_slices(tmp_path: Path) -> None:
    derived = write_series(
        tmp_path,
        _stack(30),
        prefix="mpr",
        series_uid="1.2.826.0.1.3680043.10.8.1",
        image_type=("DERIVED", "SECONDARY", "MPR"),
    )
    original = write_series(tmp_path, _stack(10), prefix="orig", series_uid="1.2.826.0.1.3680043.10.8.2")
    assert select_series([*derived, *original], CT_AXIAL).series_instance_uid == "1.2.826.0.1.3680043.10.8.2"
    strict = SelectionRule(modalities=frozenset({"CT"}), require_original_primary=True)
    assert (
        "is not ORIGINAL\\PRIMARY"
        in dict(select_series([*derived, *original], strict).rejected)["1.2.826.0.1.3680043.10.8.1"]
    )
    assert select_series(derived, CT_AXIAL).reason.count("DERIVED/SECONDARY") == 1


def test_ties_are_broken_by_thickness_then_series_number_then_uid(tmp_path: Path) -> None:
    def series(tag: str, uid: str, thickness: float, number: int) -> list[Path]:
        return write_series(
            tmp_path, _stack(8), prefix=tag, series_uid=uid, slice_thickness=thickness, series_number=number
        )

    thick = series("a", "1.2.826.0.1.3680043.10.9.1", 5.0, 1)
    thin_late = series("b", "1.2.826.0.1.3680043.10.9.2", 1.0, 7)
    thin_early_high_uid = series("c", "1.2.826.0.1.3680043.10.9.4", 1.0, 3)
    thin_early_low_uid = series("d", "1.2.826.0.1.3680043.10.9.3", 1.0, 3)
    everything = [*thick, *thin_late, *thin_early_high_uid, *thin_early_low_uid]
    expected = "1.2.826.0.1.3680043.10.9.3"
    for seed in range(3):  # the order the files arrive in never matters
        random.Random(seed).shuffle(everything)
        chosen = select_series(everything, CT_AXIAL)
        assert chosen.series_instance_uid == expected
        assert "first of 4 qualifying series" in chosen.reason
    assert select_series([*thick, *thin_late], CT_AXIAL).series_instance_uid == "1.2.826.0.1.3680043.10.9.2"
    assert (
        select_series([*thin_late, *thin_early_high_uid], CT_AXIAL).series_instance_uid
        == "1.2.826.0.1.3680043.10.9.4"
    )


def test_orientation_rule_and_mixed_orientations(tmp_path: Path) -> None:
    coronal = write_series(
        tmp_path,
        [(0.0, float(s), 0.0) for s in range(6)],
        prefix="cor",
        series_uid="1.2.826.0.1.3680043.10.10.1",
        orientation=(1, 0, 0, 0, 0, -1),
    )
    # Like a 3-plane localizer: one sagittal image among axial ones, in one series.
    mixed = write_series(tmp_path, _stack(3), prefix="mix", series_uid="1.2.826.0.1.3680043.10.10.2")
    mixed.append(
        write_slice(
            tmp_path / "mix-sag.dcm",
            position=(5.0, 0.0, 0.0),
            orientation=(0, 1, 0, 0, 0, -1),
            series_uid="1.2.826.0.1.3680043.10.10.2",
            sop_uid="1.2.826.0.1.3680043.10.10.2.99",
        )
    )
    rule = SelectionRule(modalities=frozenset({"CT"}), orientations=frozenset({"coronal"}))
    chosen = select_series([*coronal, *mixed], rule)
    assert chosen.orientation == "coronal"
    assert dict(chosen.rejected)["1.2.826.0.1.3680043.10.10.2"] == "mixed orientations axial x3, sagittal x1"
