"""Multi-label sigmoid segmentation (brats-style): overlapping labels give overlapping SEG segments.

The bundle is made here with brats' own postprocessing chain (``Activationsd(sigmoid)`` ->
``Invertd`` -> ``AsDiscreted(threshold=0.5)`` -> ``Lambdad`` merging the channels into one label
map): the runtime takes the binary channels right after the threshold, so nothing the ``Lambdad``
merges is lost. Channel 0 ("Whole tumor") fires above about 70 HU, channel 1 ("Enhancing tumor")
above about 155 HU: every voxel of channel 1 is also in channel 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import torch

from pipeline.bundle_runtime import clear_bundle_cache
from pipeline.demo.phantom import write_phantom_series
from pipeline.measure import PriorityThresholds
from pipeline.runner import PipelineResult, run
from pipeline.series_select import SelectionRule
from pipeline.spec import BundleSpec, PipelineSpec
from tests.pipeline.test_runner import WHEN, _preprocessing, _write_bundle
from tests.support.dicom_validators import assert_dciodvfy_clean, read_headers, roundtrip
from tests.support.tid1500_checks import check_pacs_triage_sr

CHANNELS = ["Whole tumor", "Enhancing tumor"]


def _multilabel_bundle(root: Path) -> BundleSpec:
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.fill_(100.0)
        assert net.bias is not None
        net.bias.copy_(torch.tensor([-60.0, -97.5]))
    inference: dict[str, Any] = {
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "preprocessing": _preprocessing([3.0, 3.0, 5.0]),
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "@image_key",
                    "nearest_interp": False,
                    "to_tensor": True,
                },  # fmt: skip
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {  # brats' merge into one label map: the runtime must not use its output
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": "$lambda x: torch.where(x[[1]] > 0, 4, torch.where(x[[0]] > 0, 2, 0))",
                },
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "/nonexistent"},
            ],
        },
    }
    return _write_bundle(root, inference, CHANNELS, net)


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], PipelineResult]:
    clear_bundle_cache()
    root = tmp_path_factory.mktemp("bundles")
    bundle = _multilabel_bundle(root / "multilabel")
    out = tmp_path_factory.mktemp("phantom")
    write_phantom_series(out, seed=3, lesions=1, slices=40)
    files = sorted(out.glob("*.dcm"))
    spec = PipelineSpec(
        name="test-multilabel",
        version="1",
        selection=SelectionRule(modalities=frozenset({"CT"}), min_slices=16),
        segmentation=bundle,
        thresholds=PriorityThresholds(urgent_volume_ml=1.0),
        min_lesion_ml=0.5,
    )
    return files, run(files, spec, input_fingerprint="multilabel-1", analysis_started=WHEN)


def test_overlapping_labels_become_overlapping_segments(
    multilabel: tuple[list[Path], PipelineResult],
) -> None:
    files, result = multilabel
    findings = result.findings.findings
    names = [f.name for f in findings]
    assert set(names) == set(CHANNELS), names  # both labels, one finding (TID 1500 group) per lesion
    assert [f.label for f in findings] == sorted(f.label for f in findings)  # channel order
    seg = result.seg
    assert seg is not None
    assert str(seg.SegmentationType) == "BINARY"
    assert len(seg.SegmentSequence) == len(findings)
    read = hd.seg.Segmentation.from_dataset(roundtrip(seg))
    sources = [str(h.SOPInstanceUID) for h in read_headers(files)]
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=sources, combine_segments=False, skip_overlap_checks=True
    )  # (slices, rows, columns, segments)
    by_label = {name: np.zeros(pixels.shape[:3], dtype=bool) for name in CHANNELS}
    for number, finding in enumerate(findings):
        by_label[finding.name] |= pixels[..., number] > 0
    enhancing, whole = by_label["Enhancing tumor"], by_label["Whole tumor"]
    assert enhancing.any()
    assert (enhancing & whole).sum() == enhancing.sum()  # overlapping, as the model said: not merged
    voxels = {name: sum(f.voxel_count for f in findings if f.name == name) for name in CHANNELS}
    assert voxels == {name: int(mask.sum()) for name, mask in by_label.items()}
    assert len(result.key_images) == len(findings) and result.kos is not None


@pytest.mark.peer
def test_multilabel_results_pass_the_validators(multilabel: tuple[list[Path], PipelineResult]) -> None:
    files, result = multilabel
    assert result.seg is not None
    assert_dciodvfy_clean(result.sr, "multi-label SR")
    assert_dciodvfy_clean(result.seg, "multi-label SEG")
    check_pacs_triage_sr(
        roundtrip(result.sr), sources=read_headers(files), findings=result.findings, seg=result.seg
    )
