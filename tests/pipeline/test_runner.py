"""``pipeline.runner.run``: study files in, findings and a validated SR (and SEG) out.

The bundles are tiny but real Model Zoo bundles made here (MONAI configs with Spacingd, an HU
window, Invertd back to the source grid; 1x1x1 convolutions with fixed weights), so a run is cheap
and its findings are predictable: "lesion" is every voxel brighter than about 150 HU.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from pipeline.bundle_runtime import bundle_sha256, clear_bundle_cache
from pipeline.demo.bundle import DEMO_BUNDLE_DIR, PINS_FILE, demo_spec, read_pins
from pipeline.demo.phantom import GroundTruth, write_phantom_series
from pipeline.errors import BundleError, NoUsableSeries
from pipeline.measure import PriorityThresholds
from pipeline.runner import STAGES, PipelineResult, run
from pipeline.series_select import SelectionRule
from pipeline.spec import BundleSpec, PipelineSpec
from pipeline.writers.sr_reader import read_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import (
    assert_dciodvfy_clean,
    assert_dsrdump_ok,
    encode,
    read_headers,
    roundtrip,
)
from tests.support.tid1500_checks import check_pacs_triage_sr, evidence_uids, referenced_uids

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
GANTRY_TILT = sorted((TESTDATA / "ct_series" / "gantry_tilt").glob("*.dcm"))
SAGITTAL_MR = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))
CT_RULE = SelectionRule(modalities=frozenset({"CT"}), min_slices=16)
WHEN = datetime.datetime(2026, 12, 3, 10, 11, 12)  # when the analysis began (the worker's clock)
THRESHOLDS = PriorityThresholds(urgent_volume_ml=1.0, critical_volume_ml=5000.0, urgent_probability=0.99)
# The real abdominal CT: bone, contrast and enhancing organs above the thresholds make hundreds of
# components (85 of at least 0.5 mL, 11 of at least 5 mL, both labels among them). As a configured
# pipeline does, these runs leave out the small ones and cap the key images: each component was its
# own SEG segment (20 frames of 512 x 512), SR group and key image, minutes per run on two cores.
ABDOMEN_LIMITS: dict[str, Any] = {"min_lesion_ml": 5.0, "max_key_images": 3}


# --- tiny bundles ---------------------------------------------------------------------------------


def _preprocessing(pixdim: list[float]) -> dict[str, Any]:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": pixdim, "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -60,
                "a_max": 160,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },  # fmt: skip
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ],
    }


def _write_bundle(
    root: Path, inference: dict[str, Any], channels: list[str], net: torch.nn.Module
) -> BundleSpec:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    channel_def = {str(i): name for i, name in enumerate(channels)}
    meta = {
        "name": root.name,
        "version": "0.0.1",
        "network_data_format": {"outputs": {"pred": {"type": "image", "channel_def": channel_def}}},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "configs" / "inference.json").write_text(json.dumps({"image_key": "image", **inference}))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return BundleSpec(path=root, sha256=bundle_sha256(root), allowed_dirs=(root.parent,), device="cpu")


def _segmentation_bundle(root: Path, channels: list[str]) -> BundleSpec:
    """Softmax over 1x1x1-convolution logits of the windowed image x in [0, 1] (HU -60..160).

    Channel 1 wins above x = 0.975 (about 155 HU: bone, contrast); channel 2, when present, between
    x = 0.6 and 0.975 (about 70-155 HU: enhancing organs).
    """
    net = torch.nn.Conv3d(1, len(channels), 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1], net.bias[1] = 100.0, -97.5
        if len(channels) > 2:
            net.weight[1], net.bias[1] = 100.0, -90.0
            net.weight[2], net.bias[2] = 20.0, -12.0
    inference = {
        "network_def": {
            "_target_": "torch.nn.Conv3d",
            "in_channels": 1,
            "out_channels": len(channels),
            "kernel_size": 1,
        },  # fmt: skip
        "preprocessing": _preprocessing([3.0, 3.0, 5.0]),
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "@image_key",
                    "nearest_interp": False,
                    "to_tensor": True,
                },  # fmt: skip
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }
    return _write_bundle(root, inference, channels, net)


def _classification_bundle(root: Path) -> BundleSpec:
    """sigmoid(max over the volume of 2x - 1): 0.73 for any study with a voxel at the window's top."""
    expression = (
        "$torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.AdaptiveMaxPool3d(1), torch.nn.Flatten())"
    )
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.AdaptiveMaxPool3d(1), torch.nn.Flatten())
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[0].bias.fill_(-1.0)
    inference = {
        "network_def": expression,
        "preprocessing": _preprocessing([6.0, 6.0, 6.0]),
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
    }
    return _write_bundle(root, inference, ["lesion present"], net)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BundleSpec]:
    root = tmp_path_factory.mktemp("bundles")
    clear_bundle_cache()
    return {
        "lesion": _segmentation_bundle(root / "tiny_lesion", ["background", "lesion"]),
        "two_labels": _segmentation_bundle(root / "tiny_two_labels", ["background", "lesion", "kidney"]),
        "classification": _classification_bundle(root / "tiny_cls"),
    }


def _spec(bundles: dict[str, BundleSpec], segmentation: str = "two_labels", **changes: Any) -> PipelineSpec:
    spec = PipelineSpec(
        name="test-ct",
        version="1",
        selection=CT_RULE,
        segmentation=bundles[segmentation],
        thresholds=THRESHOLDS,
    )
    return replace(spec, **changes)


def _abdomen_spec(bundles: dict[str, BundleSpec], **changes: Any) -> PipelineSpec:
    return _spec(bundles, **{**ABDOMEN_LIMITS, **changes})


def _instance_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _seg_source_uids(seg: Dataset) -> set[str]:
    return {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }


# --- a phantom study: single-label bundle and a classification bundle -------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], GroundTruth]:
    out = tmp_path_factory.mktemp("phantom")
    truth = write_phantom_series(out, seed=3, lesions=1, slices=40)
    return sorted(out.glob("*.dcm")), truth


@pytest.fixture(scope="module")
def phantom_result(bundles: dict[str, BundleSpec], phantom: tuple[list[Path], GroundTruth]) -> PipelineResult:
    files, _ = phantom
    spec = _spec(bundles, "lesion", classification=bundles["classification"])
    return run(files, spec, input_fingerprint="phantom-study-1", analysis_started=WHEN)


def test_phantom_study_gives_an_sr_and_a_seg_on_every_source_instance(
    bundles: dict[str, BundleSpec], phantom: tuple[list[Path], GroundTruth], phantom_result: PipelineResult
) -> None:
    files, truth = phantom
    result = phantom_result
    classes = [str(ds.SOPClassUID) for ds in result.datasets]
    assert classes[:2] == [Comprehensive3DSRStorage, SegmentationStorage]  # then key images, KOS
    assert len(result.key_images) == len(result.findings.findings) and result.kos is not None
    sr, seg = result.sr, result.seg
    assert seg is not None
    assert (result.study_instance_uid, result.series_instance_uid) == (
        truth.study_instance_uid,
        truth.series_instance_uid,
    )
    sources = _instance_uids(files)
    assert len(sources) == 40
    for ds in (sr, seg):
        assert ds.StudyInstanceUID == truth.study_instance_uid
        assert ds.SeriesInstanceUID != truth.series_instance_uid
    assert referenced_uids(sr) >= sources
    assert evidence_uids(sr) == sources | {str(seg.SOPInstanceUID)}
    assert _seg_source_uids(seg) == sources
    findings = result.findings
    # every bright component is its own lesion, numbered largest first
    assert {f.name for f in findings.findings} == {"lesion"}
    assert [f.tracking_identifier for f in findings.findings] == [
        f"lesion {n}" for n in range(1, len(findings.findings) + 1)
    ]
    volumes = [f.volume_ml for f in findings.findings]
    assert volumes == sorted(volumes, reverse=True)
    assert findings.findings[0].volume_ml > 1.0
    assert [(c.name, round(c.probability, 2)) for c in findings.classifications] == [("lesion present", 0.73)]
    assert findings.algorithm.pipeline == "test-ct"
    assert findings.algorithm.sha256 == bundles["lesion"].sha256
    assert findings.priority.name == "URGENT"
    assert tuple(result.timings) == STAGES and all(t >= 0 for t in result.timings.values())
    assert result.refused == () and result.notes == ()
    # No clock in pipeline/: the report's dates are the analysis time the caller passed (IHE AIR).
    for ds in (sr, seg):
        assert (str(ds.ContentDate), str(ds.ContentTime)) == ("20261203", "101112")
        assert (str(ds.InstanceCreationDate), str(ds.InstanceCreationTime)) == ("20261203", "101112")
    # each group names the model that produced it (issue 13 item 1)
    assert findings.classifications[0].algorithm is not None
    assert findings.classifications[0].algorithm.sha256 == bundles["classification"].sha256


@pytest.mark.peer
def test_phantom_results_pass_the_validators(
    phantom: tuple[list[Path], GroundTruth], phantom_result: PipelineResult
) -> None:
    files, _ = phantom
    sr, seg = phantom_result.sr, phantom_result.seg
    assert seg is not None
    assert_dciodvfy_clean(sr, "runner SR")
    assert_dsrdump_ok(sr, "runner SR")
    assert_dciodvfy_clean(seg, "runner SEG")
    check_pacs_triage_sr(
        roundtrip(sr), sources=read_headers(files), findings=phantom_result.findings, seg=seg
    )


# --- the real abdominal CT: determinism ----------------------------------------------------------


@pytest.fixture(scope="module")
def abdomen_result(bundles: dict[str, BundleSpec]) -> PipelineResult:
    return run(ABDOMEN, _abdomen_spec(bundles), input_fingerprint="fingerprint-A", analysis_started=WHEN)


def test_real_ct_report_references_all_20_instances(abdomen_result: PipelineResult) -> None:
    sources = _instance_uids(ABDOMEN)
    sr, seg = abdomen_result.sr, abdomen_result.seg
    assert seg is not None
    assert len(sources) == 20 and referenced_uids(sr) >= sources
    assert evidence_uids(sr) == sources | {str(seg.SOPInstanceUID)}
    assert _seg_source_uids(seg) == sources
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == pydicom.dcmread(ABDOMEN[0]).StudyInstanceUID
    assert {f.name for f in abdomen_result.findings.findings} == {"lesion", "kidney"}


def test_specks_are_no_lesions_and_only_the_largest_lesions_get_key_images(
    abdomen_result: PipelineResult,
) -> None:
    """min_lesion_ml and max_key_images (ABDOMEN_LIMITS): the SR and the SEG list every lesion of at
    least min_lesion_ml; the key images, in findings order, show the max_key_images largest; the KOS
    references exactly those and the SR; the notes say so."""
    found = abdomen_result.findings.findings
    cap = ABDOMEN_LIMITS["max_key_images"]
    assert min(f.volume_ml for f in found) >= ABDOMEN_LIMITS["min_lesion_ml"] and len(found) > cap
    assert [f.identifier for f in read_sr(abdomen_result.sr).findings] == [
        f.tracking_identifier for f in found
    ]
    assert abdomen_result.seg is not None and len(abdomen_result.seg.SegmentSequence) == len(found)
    largest = sorted(found, key=lambda f: -f.volume_ml)[:cap]
    assert [str(ds.ImageComments).split(":")[0] for ds in abdomen_result.key_images] == [
        f.tracking_identifier for f in found if f in largest
    ]
    assert abdomen_result.kos is not None
    shown = {str(ds.SOPInstanceUID) for ds in abdomen_result.key_images} | {
        str(abdomen_result.sr.SOPInstanceUID)
    }
    assert referenced_uids(abdomen_result.kos) == evidence_uids(abdomen_result.kos) == shown
    assert abdomen_result.notes == (
        f"key images for the {cap} largest of {len(found)} lesions (the pipeline's max_key_images); "
        "the others are in the SR only",
    )


def test_same_fingerprint_same_bytes_other_fingerprint_other_uids(
    bundles: dict[str, BundleSpec], abdomen_result: PipelineResult
) -> None:
    again = run(ABDOMEN, _abdomen_spec(bundles), input_fingerprint="fingerprint-A", analysis_started=WHEN)
    assert [encode(ds) for ds in again.datasets] == [encode(ds) for ds in abdomen_result.datasets]

    other = run(ABDOMEN, _abdomen_spec(bundles), input_fingerprint="fingerprint-B", analysis_started=WHEN)
    for mine, theirs in zip(other.datasets, abdomen_result.datasets, strict=True):
        assert mine.SOPInstanceUID != theirs.SOPInstanceUID
        assert mine.SeriesInstanceUID != theirs.SeriesInstanceUID
        assert mine.StudyInstanceUID == theirs.StudyInstanceUID


def test_what_changes_a_result_changes_its_uids(bundles: dict[str, BundleSpec]) -> None:
    spec = _spec(bundles)
    same = spec.result_fingerprint("fingerprint-A")
    assert same == _spec(bundles).result_fingerprint("fingerprint-A")
    # Where it runs is not what it computes...
    assert (
        replace(spec, segmentation=replace(spec.segmentation, device="cuda")).result_fingerprint(
            "fingerprint-A"
        )
        == same
    )
    # ...but the thresholds, the outputs, the bundles and the version are.
    for changed in (
        replace(spec, thresholds=PriorityThresholds(urgent_volume_ml=2.0)),
        replace(spec, make_seg=False),
        replace(spec, min_lesion_ml=0.25),
        replace(spec, max_key_images=2),
        replace(spec, classification=bundles["classification"]),
        replace(spec, segmentation=bundles["lesion"]),
        replace(spec, version="2"),
        replace(spec, name="other"),
    ):
        assert changed.result_fingerprint("fingerprint-A") != same


def test_without_seg_no_seg_comes_back(bundles: dict[str, BundleSpec]) -> None:
    """``make_seg = false`` leaves out the SEG only: the SR comes first, and key images with their KOS
    follow when lesions were found (which destinations receive them is the route's choice)."""
    result = run(
        ABDOMEN,
        _abdomen_spec(bundles, make_seg=False),
        input_fingerprint="fingerprint-A",
        analysis_started=WHEN,
    )
    classes = [str(ds.SOPClassUID) for ds in result.datasets]
    assert classes[0] == Comprehensive3DSRStorage and result.seg is None
    assert SegmentationStorage not in classes
    assert len(result.key_images) <= len(result.findings.findings)  # one per lesion with voxels
    assert (result.kos is not None) == bool(result.key_images)
    assert evidence_uids(result.sr) == _instance_uids(ABDOMEN)


# --- series that cannot be used --------------------------------------------------------------------


def test_a_study_with_no_usable_series_raises_with_the_reason(bundles: dict[str, BundleSpec]) -> None:
    mr_series = str(pydicom.dcmread(SAGITTAL_MR[0], stop_before_pixels=True).SeriesInstanceUID)
    with pytest.raises(NoUsableSeries) as raised:
        run(SAGITTAL_MR, _spec(bundles), input_fingerprint="fingerprint-A", analysis_started=WHEN)
    message = str(raised.value)
    assert "test-ct" in message and mr_series in message and "Modality MR not in ['CT']" in message

    with pytest.raises(NoUsableSeries, match="the study has no files"):
        run([], _spec(bundles), input_fingerprint="fingerprint-A", analysis_started=WHEN)


@pytest.fixture(scope="module")
def tilted_in_abdomen_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The gantry-tilt head CT, moved into the abdominal CT's study (header change only)."""
    out = tmp_path_factory.mktemp("tilted")
    study = pydicom.dcmread(ABDOMEN[0], stop_before_pixels=True).StudyInstanceUID
    for path in GANTRY_TILT:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(out / path.name)
    return sorted(out.glob("*.dcm"))


def test_a_refused_best_series_falls_back_to_the_next(
    bundles: dict[str, BundleSpec], tilted_in_abdomen_study: list[Path], abdomen_result: PipelineResult
) -> None:
    tilted = str(pydicom.dcmread(GANTRY_TILT[0], stop_before_pixels=True).SeriesInstanceUID)
    # 28 tilted slices beat 20 abdominal ones in selection; the tilted geometry is then refused.
    result = run(
        [*tilted_in_abdomen_study, *ABDOMEN],
        _abdomen_spec(bundles),
        input_fingerprint="fingerprint-A",
        analysis_started=WHEN,
    )

    assert result.series_instance_uid == abdomen_result.series_instance_uid
    assert [uid for uid, _ in result.refused] == [tilted]
    assert "variable slice spacing" in result.refused[0][1]
    assert tilted in result.selection_reason
    # Only the series used shapes the report: it is the abdominal series' report, byte for byte.
    assert [encode(ds) for ds in result.datasets] == [encode(ds) for ds in abdomen_result.datasets]


def test_a_study_whose_only_series_is_refused_names_it(
    bundles: dict[str, BundleSpec], tilted_in_abdomen_study: list[Path]
) -> None:
    tilted = str(pydicom.dcmread(GANTRY_TILT[0], stop_before_pixels=True).SeriesInstanceUID)
    with pytest.raises(NoUsableSeries) as raised:
        run(
            [*tilted_in_abdomen_study, *SAGITTAL_MR],
            _spec(bundles),
            input_fingerprint="fingerprint-A",
            analysis_started=WHEN,
        )
    message = str(raised.value)
    assert f"series {tilted} (28 slices): geometry refused" in message
    assert "variable slice spacing" in message and "Modality MR" in message


def test_a_classification_bundle_cannot_stand_in_for_segmentation(bundles: dict[str, BundleSpec]) -> None:
    with pytest.raises(BundleError, match="segmentation bundle .* outputs a classification"):
        run(
            ABDOMEN,
            _spec(bundles, "classification"),
            input_fingerprint="fingerprint-A",
            analysis_started=WHEN,
        )


# --- the spec and the demo pins --------------------------------------------------------------------


def test_bundle_spec_validates_its_pin(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256 .* must be 64 hex digits"):
        BundleSpec(path=tmp_path / "b", sha256="abc", allowed_dirs=(tmp_path,))
    with pytest.raises(ValueError, match="allowed_dirs .* is empty"):
        BundleSpec(path=tmp_path / "b", sha256="a" * 64, allowed_dirs=())
    spec = BundleSpec(path=tmp_path / "b", sha256="A" * 64, allowed_dirs=(tmp_path,), overrides={"x#y": [1]})
    assert spec.sha256 == "a" * 64 and hash(spec) == hash(replace(spec))
    with pytest.raises(TypeError):
        spec.overrides["x#y"] = 2  # type: ignore[index]


def test_demo_pins_are_read_from_pins_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not pinned"):
        demo_spec(bundle_dir=tmp_path)
    if not (DEMO_BUNDLE_DIR / "lesion_seg").is_dir():
        pytest.skip("the demo bundles are not trained yet")
    pins = read_pins(PINS_FILE)
    assert pins == {name: bundle_sha256(DEMO_BUNDLE_DIR / name) for name in pins}, (
        "PINS.json does not match the committed demo bundles: re-pin deliberately (python -m pipeline.demo.bundle --pin)"
    )
    spec = demo_spec(device="cpu")
    assert spec.segmentation.sha256 == pins["lesion_seg"]
    assert spec.classification is not None and spec.classification.sha256 == pins["lesion_cls"]
