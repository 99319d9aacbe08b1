"""Detection kind (issue 14): lung_nodule_ct_detection runs unchanged (random weights) to a dciodvfy-clean SR.

The bundle in ``shared/bundles`` is copied unchanged; the tests add only ``models/model.pt``, a seeded
random initialisation of its own ``network_def`` (built with the runtime's torchvision stand-ins). The
untrained detector returns boxes above the bundle's own threshold (0.02; scores ~0.1 here), up to its
300, so the pipeline's ``max_boxes`` keeps the report small. The pipeline sets ``whether_raw_luna16 = true``, the bundle's own switch for
input that is not already resampled: its ``Spacingd`` then resamples to 0.703125 x 0.703125 x 1.25 mm,
as a DICOM CT needs.

Geometry is checked against a known answer: a bright cube painted at known voxels of a phantom CT
(its extent in patient coordinates follows from the DICOM ImagePositionPatient and spacing) is found
in the bundle's preprocessed image and forced as a detector box through the bundle's own
postprocessing; it must come out at the cube's LPS extent.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch

from daemon.delivery.report import report_of
from pipeline.bundle_config import build_parser
from pipeline.bundle_pins import read_bundle_files
from pipeline.bundle_runtime import BundleKind, BundleRuntime, bundle_sha256, clear_bundle_cache
from pipeline.demo.phantom import PhantomOptions, write_phantom_series
from pipeline.detection import boxes_lps, detection_build, score_threshold
from pipeline.detection_findings import DetectionOptions
from pipeline.geometry import load_volume
from pipeline.measure import PriorityThresholds
from pipeline.orientation import Orientation
from pipeline.runner import run
from pipeline.series_select import SelectionRule
from pipeline.spec import BundleSpec, PipelineSpec
from pipeline.volume import Volume
from pipeline.writers.sr_reader import read_sr
from tests.paths import BUNDLES as ZOO
from tests.pipeline.test_runner import WHEN
from tests.support.dicom_validators import assert_dciodvfy_clean, read_headers, roundtrip
from tests.support.tid1500_checks import check_tid1500_generic

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

NAME = "lung_nodule_ct_detection"
RAW_INPUT = {"whether_raw_luna16": True}  # resample (Spacingd) as for raw LUNA16: our DICOM is not resampled
PHANTOM = PhantomOptions(matrix=64, pixel_spacing_mm=1.0, slice_thickness_mm=2.5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unchanged bundle with seeded random weights."""
    root = tmp_path_factory.mktemp("bundles")
    path = Path(shutil.copytree(ZOO / NAME, root / NAME))
    files = read_bundle_files(path)
    with detection_build(files):
        parser = build_parser(files, RAW_INPUT, torch.device("cpu"))
        torch.manual_seed(0)
        network = parser.get_parsed_content("network_def")
    (path / "models").mkdir()
    torch.save(network.state_dict(), path / "models" / "model.pt")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("study")
    write_phantom_series(out, seed=5, lesions=0, slices=16, options=PHANTOM)
    return sorted(out.glob("*.dcm"))


def _bundle_spec(bundle: Path) -> BundleSpec:
    return BundleSpec(
        path=bundle,
        sha256=bundle_sha256(bundle),
        allowed_dirs=(bundle.parent,),
        overrides=RAW_INPUT,
        device="cpu",
    )


def _spec(bundle: Path, **kwargs: object) -> PipelineSpec:
    return PipelineSpec(
        name="zoo-lung-nodule",
        version="1",
        selection=SelectionRule(
            modalities=frozenset({"CT"}), orientations=frozenset(Orientation), min_slices=8
        ),
        segmentation=None,
        detection=_bundle_spec(bundle),
        detection_options=DetectionOptions(max_boxes=4),
        thresholds=PriorityThresholds(urgent_probability=0.1),
        **kwargs,  # type: ignore[arg-type]
    )


def _inside(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The LPS bounding box of the volume's voxel centres, widened by one voxel."""
    ni, nj, nk = volume.array.shape
    corners = (
        np.array([[i, j, k, 1.0] for i in (-1, ni) for j in (-1, nj) for k in (-1, nk)]) @ volume.affine.T
    )
    return corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)


@pytest.mark.peer
def test_lung_nodule_detection_runs_unchanged(bundle: Path, study: list[Path]) -> None:
    clear_bundle_cache()
    result = run(study, _spec(bundle), input_fingerprint="zoo-lung-nodule", analysis_started=WHEN)
    volume = load_volume(study)
    boxes = result.findings.detections
    assert 1 <= len(boxes) <= 4, f"{len(boxes)} boxes: random weights give some (scores ~0.1), capped at 4"
    assert not result.findings.findings and result.seg is None  # boxes, not segments
    assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)
    assert [b.index for b in boxes] == list(range(1, len(boxes) + 1))
    assert {b.name for b in boxes} == {"lesion"}  # the bundle's metadata names no class
    low, high = _inside(volume)
    for b in boxes:
        assert np.all(np.asarray(b.box_lps[:3]) >= low - 1e-3) and np.all(
            np.asarray(b.box_lps[3:]) <= high + 1e-3
        )
    assert result.findings.priority.name == ("URGENT" if boxes[0].score >= 0.1 else "ROUTINE")

    assert_dciodvfy_clean(result.sr, "lung nodule SR")
    sr = hd.sr.Comprehensive3DSR.from_dataset(roundtrip(result.sr))
    groups = check_tid1500_generic(roundtrip(result.sr))
    assert [g.tracking_identifier for g in groups] == [b.tracking_identifier for b in boxes]
    read = sr.content.get_volumetric_roi_measurement_groups()
    assert len(read) == len(boxes)
    for group, box in zip(read, boxes, strict=True):
        surface = group.roi
        assert surface is not None and surface.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID
        assert surface.frame_of_reference_uid == volume.frame_of_reference_uid
        points = np.asarray(
            surface.graphic_data[0] if isinstance(surface.graphic_data, list) else surface.graphic_data
        )
        np.testing.assert_allclose(points.min(axis=0), box.box_lps[:3], atol=1e-3)  # the box, exactly
        np.testing.assert_allclose(points.max(axis=0), box.box_lps[3:], atol=1e-3)
        by_name = {m.name.meaning: m for m in group.get_measurements()}
        assert set(by_name) == {"Probability", "Left-Right Axis", "Anterior-Posterior Axis", "Head-Foot Axis"}
        assert by_name["Probability"].value == pytest.approx(box.score, abs=0.006)
        for meaning, extent in zip(
            ("Left-Right Axis", "Anterior-Posterior Axis", "Head-Foot Axis"), box.size_mm, strict=True
        ):
            assert by_name[meaning].unit.value == "mm"
            assert by_name[meaning].value == pytest.approx(extent, rel=0.006)
        assert group.finding_type is not None and group.finding_type.meaning == "Lesion"

    reported = read_sr(roundtrip(result.sr))  # what the HL7 and FHIR results are built from
    assert reported.classifications == () and reported.findings == ()
    assert [r.identifier for r in reported.boxes] == [b.tracking_identifier for b in boxes]
    for r, b in zip(reported.boxes, boxes, strict=True):
        assert r.score == pytest.approx(b.score, abs=0.006)
        np.testing.assert_allclose(r.box_lps, b.box_lps, atol=1e-3)
    measured = report_of(roundtrip(result.sr)).measurements
    assert len(measured) == 4 * len(boxes)  # score and three extents per box
    assert {m.unit for m in measured} == {"1", "mm"}

    assert result.key_images, "a box through pixel centres gets a key image"
    for image in result.key_images:
        assert_dciodvfy_clean(image, "box key image")
    assert result.kos is not None
    assert_dciodvfy_clean(result.kos, "KOS of the box key images")
    assert result.series_instance_uid == str(read_headers(study[:1])[0].SeriesInstanceUID)


def test_forced_box_lands_on_the_known_patient_coordinates(bundle: Path, study: list[Path]) -> None:
    runtime = BundleRuntime.load(
        bundle, sha256=bundle_sha256(bundle), allowed_dirs=[bundle.parent], device="cpu", overrides=RAW_INPUT
    )
    assert score_threshold(runtime) == pytest.approx(0.02)  # the bundle's own detector_ops were evaluated
    volume = load_volume(study)
    # A bright cube off-centre in every axis: voxels i 40..47, j 10..15, k 3..8 of the source grid.
    lo_ijk, hi_ijk = np.array([40, 10, 3]), np.array([47, 15, 8])
    painted = np.full(volume.array.shape, -1000.0, dtype=np.float32)  # air, so only the cube is bright
    painted[lo_ijk[0] : hi_ijk[0] + 1, lo_ijk[1] : hi_ijk[1] + 1, lo_ijk[2] : hi_ijk[2] + 1] = 2000.0
    cube = dataclasses.replace(volume, array=painted)
    # Its LPS extent from the DICOM headers alone (axial slices, rows along +x, columns along +y): the
    # ImagePositionPatient of the cube's first and last slice, and the pixel spacing.
    by_uid = {str(h.SOPInstanceUID): h for h in read_headers(study)}
    ends = [by_uid[volume.source_instances[int(k)].sop_instance_uid] for k in (lo_ijk[2], hi_ijk[2])]
    assert all(np.allclose([float(v) for v in h.ImageOrientationPatient], [1, 0, 0, 0, 1, 0]) for h in ends)
    ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in ends])
    column_mm, row_mm = float(ends[0].PixelSpacing[1]), float(ends[0].PixelSpacing[0])
    half_slice = float(ends[0].SliceThickness) / 2
    expected_lo = np.array(
        [
            ipp[0, 0] + (lo_ijk[0] - 0.5) * column_mm,
            ipp[0, 1] + (lo_ijk[1] - 0.5) * row_mm,
            ipp[:, 2].min() - half_slice,
        ]
    )
    expected_hi = np.array(
        [
            ipp[0, 0] + (hi_ijk[0] + 0.5) * column_mm,
            ipp[0, 1] + (hi_ijk[1] + 0.5) * row_mm,
            ipp[:, 2].max() + half_slice,
        ]
    )

    with runtime.code.active():
        image = runtime.preprocessing({runtime.image_key: runtime._image(cube)})[runtime.image_key]
    bright = np.argwhere(image[0].numpy() > 0.5)  # the cube is 1.0 (clipped at 300 HU), air ~0.02
    box = np.concatenate([bright.min(axis=0) - 0.5, bright.max(axis=0) + 0.5])  # voxel edges, xyzxyz
    item = {
        "box": torch.as_tensor(box[None], dtype=torch.float32),
        "label": torch.tensor([0]),
        "label_scores": torch.tensor([0.9]),
        runtime.image_key: image,
    }
    _, corners = boxes_lps(item, runtime.postprocessing_steps, runtime.image_key)
    assert corners.shape == (1, 6)
    # within half a resampled voxel (0.70 x 0.70 x 1.25 mm; measured: <= 0.39 mm in x/y, 0.625 mm in z) of
    # the cube's faces; a wrong sign or axis would be 16-40 mm off
    np.testing.assert_allclose(corners[0, :3], expected_lo, atol=0.7)
    np.testing.assert_allclose(corners[0, 3:], expected_hi, atol=0.7)


def test_detection_prediction_of_the_runtime(bundle: Path, study: list[Path]) -> None:
    runtime = BundleRuntime.load(
        bundle, sha256=bundle_sha256(bundle), allowed_dirs=[bundle.parent], device="cpu", overrides=RAW_INPUT
    )
    prediction = runtime.predict(load_volume(study), pipeline="p")
    assert prediction.kind is BundleKind.DETECTION and prediction.boxes is not None
    assert prediction.label_names == ("lesion",)
    assert all(b.score >= 0.02 for b in prediction.boxes)  # the bundle's own threshold
    assert len(prediction.boxes) <= 300  # its detections_per_img


def test_detection_spec_is_its_own_pipeline(bundle: Path) -> None:
    with pytest.raises(ValueError, match="detection pipeline runs its detection bundle only"):
        _spec(bundle, classification=_bundle_spec(bundle))
    base = _spec(bundle)
    assert (
        base.identity()
        != dataclasses.replace(base, detection_options=DetectionOptions(max_boxes=5)).identity()
    )
    assert (
        base.identity()
        != dataclasses.replace(base, detection_options=DetectionOptions(min_score=0.5)).identity()
    )
    with pytest.raises(ValueError, match="max_boxes"):
        DetectionOptions(max_boxes=0)
    with pytest.raises(ValueError, match="min_score"):
        DetectionOptions(min_score=1.5)


def test_torchvision_stand_ins_exist_only_while_a_detector_is_built(bundle: Path) -> None:
    import importlib.util

    from monai.apps.detection.networks import retinanet_network
    from monai.networks.blocks import backbone_fpn_utils
    from monai.networks.nets import resnet

    from pipeline.detection_compat import IntermediateLayerGetter, torchvision_stand_ins

    assert importlib.util.find_spec("torchvision") is None, "this test is about a host without torchvision"
    placeholders = (retinanet_network._validate_trainable_layers, backbone_fpn_utils.torchvision_models)
    with torchvision_stand_ins():
        assert retinanet_network._validate_trainable_layers(False, None, 5, 3) == 5  # untrained: all train
        assert retinanet_network._validate_trainable_layers(True, None, 5, 3) == 3
        assert backbone_fpn_utils.torchvision_models._utils.IntermediateLayerGetter is IntermediateLayerGetter
    assert (
        retinanet_network._validate_trainable_layers,
        backbone_fpn_utils.torchvision_models,
    ) == placeholders
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401  # nothing was registered as torchvision

    # torchvision's module names, so a zoo checkpoint's keys load: the backbone's children up to layer2
    backbone = resnet.resnet50(spatial_dims=3, n_input_channels=1)
    getter = IntermediateLayerGetter(backbone, {"layer1": "0", "layer2": "1"})
    assert list(getter.keys()) == ["conv1", "bn1", "act", "maxpool", "layer1", "layer2"]
    out = getter(torch.zeros(1, 1, 16, 16, 16))
    assert list(out) == ["0", "1"]
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("feature_extractor.body.layer2.") for k in state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lung_nodule_on_cuda_with_amp(bundle: Path, study: list[Path]) -> None:
    sha = bundle_sha256(bundle)
    volume = load_volume(study)
    cpu = BundleRuntime.load(
        bundle, sha256=sha, allowed_dirs=[bundle.parent], device="cpu", overrides=RAW_INPUT
    )
    cuda = BundleRuntime.load(
        bundle, sha256=sha, allowed_dirs=[bundle.parent], device="cuda", overrides=RAW_INPUT
    )
    assert cuda.device.type == "cuda" and cuda.amp
    on_cpu, on_cuda = cpu.predict(volume), cuda.predict(volume)
    assert on_cuda.kind is BundleKind.DETECTION and on_cuda.boxes and on_cpu.boxes
    low, high = _inside(volume)
    for b in on_cuda.boxes:
        assert np.all(np.asarray(b.box_lps[:3]) >= low - 1e-3) and np.all(
            np.asarray(b.box_lps[3:]) <= high + 1e-3
        )
    # float16 moves scores a little (and may reorder near-equal ones), not the boxes: CUDA's best is a CPU box
    distances = [np.abs(np.subtract(on_cuda.boxes[0].box_lps, b.box_lps)).max() for b in on_cpu.boxes]
    assert min(distances) < 2.0, f"CUDA's best box is {min(distances):.1f} mm from every CPU box"


def test_which_boxes_are_reported_and_how_they_triage() -> None:
    from pipeline.bundle_runtime import Prediction
    from pipeline.detection_findings import findings_from_detections
    from pipeline.findings import AlgorithmInfo, Detection

    def box(name: str, score: float, x: float) -> Detection:
        return Detection(
            label=0 if name == "nodule" else 1, name=name, score=score, box_lps=(x, 0, 0, x + 4, 5, 6)
        )

    algorithm = AlgorithmInfo(name="det", version="1", sha256="0" * 64, pipeline="p")
    prediction = Prediction(
        kind=BundleKind.DETECTION,
        label_names=("nodule", "mass"),
        algorithm=algorithm,
        boxes=(box("nodule", 0.3, 0), box("mass", 0.95, 10), box("nodule", 0.8, 20), box("nodule", 0.05, 30)),
    )
    thresholds = PriorityThresholds(
        urgent_probability=0.7, critical_probability=0.9, labels=frozenset({"nodule"})
    )
    measured = findings_from_detections(prediction, thresholds, DetectionOptions(min_score=0.1, max_boxes=2))
    found = measured.findings.detections
    assert [(b.name, b.index, b.score) for b in found] == [("mass", 1, 0.95), ("nodule", 1, 0.8)]
    assert found[1].type is not None and found[1].type.meaning == "Nodule"  # coded from its class name
    # the mass scores 0.95 but does not count (labels); the nodule's 0.8 reaches urgent, not critical
    assert measured.findings.priority.name == "URGENT"
    assert "1 more box not reported (max_boxes)" in measured.findings.summary
    assert measured.lesion_map is None
    only_nodules = findings_from_detections(
        prediction, thresholds, DetectionOptions(), reported=frozenset({"nodule"})
    ).findings.detections
    assert [(b.index, b.score) for b in only_nodules] == [(1, 0.8), (2, 0.3), (3, 0.05)]  # no min_score: all
    assert only_nodules[0].tracking_identifier == "nodule box 1"
    assert only_nodules[0].centre_lps == (22.0, 2.5, 3.0) and only_nodules[0].size_mm == (4.0, 5.0, 6.0)
