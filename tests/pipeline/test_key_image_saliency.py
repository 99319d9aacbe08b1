"""The key images' optional saliency overlay (issue 13 item 10): the demo classifier's Grad-CAM.

The demo phantom (seed 5, two lesions) goes through the demo classifier bundle's Grad-CAM
(``pipeline.saliency``), mapped back to the source grid; its ground-truth label map stands in for a
segmentation. With the overlay on, the tinted pixels of each key image crowd near the lesions
(denser inside a dilated lesion mask than outside), the image stays dciodvfy clean with Burned In
Annotation YES; without it (None, or nothing above the threshold) the pixels are exactly those of
a key image without the option.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from scipy import ndimage

from daemon.config import MonaiPipelineConfig
from daemon.pipelines.monai import spec_from_config
from pipeline.bundle_runtime import load_bundle
from pipeline.demo.bundle import demo_spec
from pipeline.demo.phantom import GroundTruth, lesion_label_map, write_phantom_series
from pipeline.findings import Findings
from pipeline.geometry import load_volume
from pipeline.measure import measure_lesions
from pipeline.runner import run
from pipeline.saliency import saliency_map
from pipeline.writers.key_images import KeyImageLayout, render, write_key_images
from tests.support.dicom_validators import ALGORITHM, assert_dciodvfy_clean
from vocabulary import Priority

pytestmark = [pytest.mark.peer]  # dciodvfy is a real external tool

WHEN = datetime.datetime(2026, 12, 3, 10, 30, 5)
FINGERPRINT = "sha256:saliency-study"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out: Path = tmp_path_factory.mktemp("two-lesions")
    truth: GroundTruth = write_phantom_series(out, seed=5, lesions=2, slices=48)
    files = sorted(out.glob("*.dcm"))
    volume = load_volume(files)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p, stop_before_pixels=True) for p in files)}
    headers = [by_uid[ref.sop_instance_uid] for ref in volume.source_instances]
    labels = (lesion_label_map(truth, volume.affine, volume.array.shape) > 0).astype(np.uint8)
    found, lesion_map = measure_lesions(labels, volume, ("background", "liver lesion"))
    findings = Findings(algorithm=ALGORITHM, findings=found, priority=Priority.URGENT, summary="two lesions")
    bundle = demo_spec(device="cpu").classification
    assert bundle is not None
    runtime = load_bundle(bundle.path, sha256=bundle.sha256, allowed_dirs=bundle.allowed_dirs, device="cpu")
    saliency = saliency_map(runtime, volume)

    def images(**kwargs: object) -> tuple:
        return write_key_images(
            lesion_map,
            volume,
            headers,
            findings,
            input_fingerprint=FINGERPRINT,
            content_datetime=WHEN,
            **kwargs,
        )

    return {
        "volume": volume,
        "lesion_map": lesion_map,
        "saliency": saliency,
        "off": images(),
        "on": images(saliency=saliency),
    }


def test_the_saliency_map_lies_on_the_source_grid_in_0_1(made: dict) -> None:
    saliency = made["saliency"]
    assert saliency.shape == made["volume"].array.shape and saliency.dtype == np.float32
    assert 0.0 <= float(saliency.min()) and float(saliency.max()) <= 1.0 and float(saliency.max()) > 0.5


def test_the_overlay_is_concentrated_near_the_lesions(made: dict) -> None:
    lesion_map = made["lesion_map"]
    for off, on in zip(made["off"], made["on"], strict=True):
        uids = [ref.sop_instance_uid for ref in made["volume"].source_instances]
        k = uids.index(str(on.SourceImageSequence[0].ReferencedSOPInstanceUID))
        layout = KeyImageLayout(*made["volume"].array.shape[1::-1])
        rows, columns = layout.image_box()
        tinted = (on.pixel_array != off.pixel_array).any(axis=-1)[rows, columns]
        tinted = tinted[:: layout.scale, :: layout.scale]  # back to source pixels [row, column]
        near = ndimage.binary_dilation(lesion_map[:, :, k].T > 0, iterations=6)
        assert tinted.any(), "no overlay pixel at all"
        inside, outside = tinted[near].mean(), tinted[~near].mean()
        assert inside > 1.5 * outside, (inside, outside)
        assert (on.pixel_array != off.pixel_array).any(axis=-1)[: layout.band].sum() == 0  # banner untouched


def test_the_key_images_with_an_overlay_stay_valid(made: dict) -> None:
    for number, (off, on) in enumerate(zip(made["off"], made["on"], strict=True), start=1):
        assert on.BurnedInAnnotation == "YES"
        assert "Grad-CAM" in on.DerivationDescription and "Grad-CAM" not in off.DerivationDescription
        assert on.SOPInstanceUID == off.SOPInstanceUID  # same image, drawn with the option
        assert_dciodvfy_clean(on, f"key image {number} with saliency")


def test_without_saliency_the_pixels_are_unchanged() -> None:
    rng = np.random.default_rng(0)
    slice_rc = rng.normal(40, 50, (64, 64))
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:30, 20:30] = True
    layout = KeyImageLayout(64, 64)
    plain = render(slice_rc, mask, (40.0, 400.0), layout, ("a", "b"))
    cold = render(slice_rc, mask, (40.0, 400.0), layout, ("a", "b"), saliency_rc=np.full((64, 64), 0.5))
    assert plain.tobytes() == cold.tobytes()  # nothing above the threshold: not one byte differs
    hot = render(slice_rc, mask, (40.0, 400.0), layout, ("a", "b"), saliency_rc=np.ones((64, 64)))
    outline = (plain == (255, 40, 40)).all(axis=-1)
    assert outline.any() and (hot[outline] == plain[outline]).all()  # the outline is drawn over the tint


def test_the_option_is_off_by_default_enters_the_identity_only_when_on_and_needs_both_bundles() -> None:
    spec = demo_spec(device="cpu")
    assert spec.saliency is False
    on = dataclasses.replace(spec, saliency=True)
    assert on.identity() != spec.identity()
    assert dataclasses.replace(on, saliency=False).identity() == spec.identity()
    with pytest.raises(ValueError, match="saliency .* needs both a segmentation and a classification bundle"):
        dataclasses.replace(spec, classification=None, saliency=True)
    base = {"name": "ct", "allowed_dirs": ["/opt/bundles"]}
    bundles = {"segmentation": {"path": "/opt/bundles/seg", "sha256": "0" * 64}}
    bundles["classification"] = {"path": "/opt/bundles/cls", "sha256": "1" * 64}
    assert MonaiPipelineConfig.model_validate({**base, **bundles}).saliency is False
    assert spec_from_config(
        MonaiPipelineConfig.model_validate({**base, **bundles, "saliency": True})
    ).saliency


def test_the_runner_draws_the_overlay_when_the_pipeline_asks(tmp_path: Path) -> None:
    write_phantom_series(tmp_path, seed=5, lesions=2, slices=48)
    files = sorted(tmp_path.glob("*.dcm"))
    spec = dataclasses.replace(demo_spec(device="cpu"), saliency=True)
    result = run(files, spec, input_fingerprint="saliency-run", analysis_started=WHEN)
    assert result.key_images, result.notes
    for image in result.key_images:
        assert "Grad-CAM" in image.DerivationDescription and image.BurnedInAnnotation == "YES"
