"""Issue 14 item 3: ``pacs-triage bundle check`` of a multi-channel bundle (the real brats config, four MR
channels T1c, T1, T2, FLAIR), on four series derived from the real MR (tests/pipeline/brats_study.py).

The channels come from its metadata.json; each series is assigned by ``--channel NAME=REGEX`` or by the
channel's name in its Series Description, through pipeline.multiseries (the service's selection and
stacking). Four series: one inference (random weights) to a dciodvfy-clean SR, the assignment printed;
without FLAIR: exit 1 naming it; without --input: exit 2 saying how to give the series.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from pipeline.bundle_inspect import channel_rules, describe_bundle
from pipeline.multiseries import Channel, MultiSeriesInput, select_channels
from pipeline.orientation import ORIENTATIONS
from pipeline.series_select import SelectionRule
from tests.paths import BUNDLES
from tests.pipeline.brats_study import CHANNELS, write_brats_study
from tests.support.dicom_validators import assert_dciodvfy_clean
from tests.support.process import clean_env, run_cli

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

BRATS = BUNDLES / "brats_mri_segmentation"
# The derived T1c is "SAG T1 POST GAD": its description does not name "T1c", so the check is told.
T1C = "T1c=post gad"


def _check(home: Path, *args: str) -> tuple[int, str, str]:
    env = clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_LOGGING__LEVEL": "ERROR"})
    done = run_cli("bundle", "check", *args, env=env, timeout=900)
    return done.returncode, done.stdout, done.stderr


def _series_uids(study: dict[str, list[Path]]) -> dict[str, str]:
    return {
        n: str(pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID) for n, p in study.items()
    }


def test_metadata_channels_and_the_loader_they_replace() -> None:
    summary = describe_bundle(BRATS)
    assert (summary.num_channels, summary.input_channels, summary.multiseries) == (4, CHANNELS, True)
    loader = next(i for i in summary.items if i.id == "preprocessing#transforms#0")
    assert loader.action == "replaced"
    assert loader.detail.startswith("LoadImaged of a channel list (T1c, T1, T2, FLAIR) -> Identityd")
    # three channels of one image (channel_def names one): a single-series bundle
    breast = describe_bundle(BUNDLES / "breast_density_classification")
    assert (breast.num_channels, breast.input_channels, breast.multiseries) == (3, (), False)
    spleen = describe_bundle(BUNDLES / "spleen_ct_segmentation")
    assert (spleen.num_channels, spleen.multiseries) == (1, False)
    assert all("channel list" not in i.detail for i in spleen.items)


def test_channels_by_name_go_through_the_services_selection(tmp_path: Path) -> None:
    study = write_brats_study(tmp_path / "study")
    for path in study["T1c"]:  # a T1c named as such: then every channel is found by its name
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "sag t1c"
        ds.save_as(path, enforce_file_format=True)
    rules = channel_rules(CHANNELS, {})
    inputs = MultiSeriesInput(
        channels=tuple(
            Channel(
                name=r.name,
                rule=SelectionRule(
                    modalities=frozenset({"MR"}),
                    orientations=ORIENTATIONS,
                    series_description=r.series_description,
                ),
            )
            for r in rules
        )
    )
    chosen = select_channels([p for paths in study.values() for p in paths], inputs)
    # "SAG T2 FLAIR" names T2 too, and has the lower SeriesNumber: still FLAIR's, not T2's
    assert [s.series_instance_uid for s in chosen.series] == [_series_uids(study)[n] for n in CHANNELS]
    assert [r.why.startswith("by name") for r in rules] == [True] * 4
    given = channel_rules(CHANNELS, {"t1C": "post gad"})[0]  # names are matched without case
    assert (given.name, given.series_description, given.why) == (
        "T1c",
        "(?i)post gad",
        "--channel T1c=post gad",
    )
    with pytest.raises(ValueError, match="no channel 'T3'"):
        channel_rules(CHANNELS, {"T3": "x"})
    with pytest.raises(ValueError, match="not a regular expression"):
        channel_rules(CHANNELS, {"T1": "("})


def test_without_input_it_says_how_to_give_the_series(tmp_path: Path) -> None:
    code, stdout, stderr = _check(
        tmp_path / "home", str(BRATS), "--random-weights", "--out", str(tmp_path / "o")
    )
    assert code == 2, stdout + stderr
    assert "input: 4 channels (metadata.json num_channels), channel_def 0 T1c, 1 T1, 2 T2, 3 FLAIR" in stdout
    assert "one series per channel" in stderr and "--channel NAME=REGEX" in stderr, stderr
    assert not (tmp_path / "o" / "random-weights").exists()  # a usage error costs nothing


def test_missing_flair_is_exit_1_naming_it(tmp_path: Path) -> None:
    write_brats_study(tmp_path / "study", channels=("T1c", "T1", "T2"))
    out = tmp_path / "o"
    code, stdout, stderr = _check(
        tmp_path / "home", str(BRATS), "--random-weights", "--input", str(tmp_path / "study"),
        "--channel", T1C, "--out", str(out),
    )  # fmt: skip
    assert code == 1, stdout + stderr
    assert "missing input series FLAIR" in stderr and "channel 3 'FLAIR' is missing" in stderr, stderr
    assert "channel 3 FLAIR: by name" in stdout, stdout
    report = json.loads((out / "check.json").read_text())
    assert report["run"] is None
    assert [p for p in report["problems"] if "missing input series FLAIR" in p], report["problems"]
    assert not (out / "SR.dcm").exists()


@pytest.mark.slow  # one brats inference: ~60-70 s and ~3.8 GB here
@pytest.mark.peer
def test_brats_four_series_with_random_weights_to_a_valid_sr(tmp_path: Path) -> None:
    study = write_brats_study(tmp_path / "study")
    uids = _series_uids(study)
    out = tmp_path / "check"
    code, stdout, stderr = _check(
        tmp_path / "home", str(BRATS), "--random-weights", "--input", str(tmp_path / "study"),
        "--channel", T1C, "--out", str(out),
    )  # fmt: skip
    assert code == 0, stdout + stderr
    assert (
        "replaced   preprocessing#transforms#0: LoadImaged of a channel list (T1c, T1, T2, FLAIR)" in stdout
    )
    lines = [
        f"channel 0 T1c <- series #4 'SAG T1 POST GAD' {uids['T1c']}: --channel T1c=post gad",
        f"channel 1 T1 <- series #3 'SAG T1' {uids['T1']}: by name",
        f"channel 2 T2 <- series #2 'SAG T2 FSE' {uids['T2']}: by name",
        f"channel 3 FLAIR <- series #1 'SAG T2 FLAIR' {uids['FLAIR']}: by name",
    ]
    at = [stdout.index(line) for line in lines]  # each printed, in channel order
    assert at == sorted(at), stdout
    report = json.loads((out / "check.json").read_text())
    assert report["problems"] == []
    run = report["run"]
    assert [(c["channel"], c["series_instance_uid"]) for c in run["channels"]] == [
        (n, uids[n]) for n in CHANNELS
    ]
    assert run["seconds"] > 0 and run["peak_rss_mib"] > 0
    assert run["results"][:2] == ["SR.dcm", "SEG.dcm"]
    sr = pydicom.dcmread(out / "SR.dcm")
    assert sr.StudyInstanceUID == pydicom.dcmread(study["T1c"][0], stop_before_pixels=True).StudyInstanceUID
    evidence = {
        s.SeriesInstanceUID
        for e in sr.CurrentRequestedProcedureEvidenceSequence
        for s in e.ReferencedSeriesSequence
    }
    assert set(uids.values()) <= evidence  # the SR names every channel's series as its evidence
    for name in run["results"]:
        assert_dciodvfy_clean(pydicom.dcmread(out / name), name)
