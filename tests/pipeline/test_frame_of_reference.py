"""A Frame of Reference UID absent from every slice of a series (issue 11 item 5).

Anonymisers strip FrameOfReferenceUID; such a series was refused before anything else, which
hid the real geometry reasons. Now: absent from every slice -> one frame of reference under a
UID derived from the series, with a warning that the job records (PipelineResult.notes, which
the MONAI adapter puts in the job's summary); absent from some slices -> still refused.
"""

from __future__ import annotations

import datetime as dt
import inspect
import shutil
from pathlib import Path

import pydicom
import pytest

from pipeline.errors import GeometryError
from pipeline.geometry import load_volume
from pipeline.runner import run
from pipeline.spec import BundleSpec
from pipeline.uids import derive_uid
from tests.paths import TESTDATA
from tests.pipeline.test_geometry import write_series
from tests.pipeline.test_runner import _abdomen_spec, bundles  # noqa: F401  (bundles is a fixture)
from vocabulary import is_valid_uid

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
SERIES = "1.2.826.0.1.3680043.10.1.1"


def _strip(files: list[Path], which: set[int] | None = None, value: str | None = None) -> list[Path]:
    for n, path in enumerate(files):
        if which is None or n in which:
            ds = pydicom.dcmread(path)
            if value is None:
                del ds.FrameOfReferenceUID
            else:
                ds.FrameOfReferenceUID = value
            ds.save_as(path)
    return files


def test_absent_from_every_slice_is_one_frame_with_a_warning(tmp_path: Path) -> None:
    files = _strip(write_series(tmp_path, [(0, 0, z) for z in range(5)]))
    volume = load_volume(files)
    assert volume.frame_of_reference_uid == derive_uid(SERIES, "frame-of-reference")
    assert is_valid_uid(volume.frame_of_reference_uid)
    (warning,) = volume.warnings
    assert "no FrameOfReferenceUID on any slice" in warning and SERIES in warning
    assert volume.array.shape[2] == 5


def test_present_on_every_slice_gives_no_warning(tmp_path: Path) -> None:
    volume = load_volume(write_series(tmp_path, [(0, 0, z) for z in range(5)]))
    assert volume.frame_of_reference_uid == "1.2.826.0.1.3680043.10.1.9"
    assert volume.warnings == ()


def test_absent_from_some_slices_is_still_refused(tmp_path: Path) -> None:
    files = _strip(write_series(tmp_path, [(0, 0, z) for z in range(5)]), which={1, 3})
    with pytest.raises(GeometryError, match=r"mixed FrameOfReferenceUID.*\(absent\)"):
        load_volume(files)


def test_present_but_not_a_uid_is_refused(tmp_path: Path) -> None:
    files = _strip(write_series(tmp_path, [(0, 0, z) for z in range(5)]), value="not-a-uid")
    with pytest.raises(GeometryError, match=r"FrameOfReferenceUID 'not-a-uid' is missing or invalid"):
        load_volume(files)


def test_the_run_records_the_warning_and_writes_results_in_the_derived_frame(
    tmp_path: Path,
    bundles: dict[str, BundleSpec],  # noqa: F811
) -> None:
    files = []
    for path in ABDOMEN:
        files.append(Path(shutil.copy(path, tmp_path / path.name)))
    _strip(files)
    # (run gains a required analysis_started in a change being made alongside this one)
    when = {"analysis_started": dt.datetime(2026, 12, 3, 10, 0)}
    extra = when if "analysis_started" in inspect.signature(run).parameters else {}
    result = run(files, _abdomen_spec(bundles), input_fingerprint="no-frame-of-reference", **extra)
    assert any("no FrameOfReferenceUID on any slice" in note for note in result.notes), result.notes
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    if result.seg is not None:
        assert result.seg.FrameOfReferenceUID == derive_uid(series, "frame-of-reference")
