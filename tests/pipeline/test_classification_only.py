"""Classification-only pipelines: a study-level probability sets the priority; an SR, no SEG.

The classifier is test_runner's tiny one (0.73 for any study with a voxel at the top of its HU
window); the config side: an entry with only a classification bundle is a valid pipeline, one
with neither bundle is refused with a sentence saying what to give.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.uid import Comprehensive3DSRStorage

from daemon.config import MonaiPipelineConfig
from daemon.pipelines.monai import spec_from_config
from pipeline.bundle_runtime import clear_bundle_cache
from pipeline.demo.phantom import write_phantom_series
from pipeline.measure import PriorityThresholds
from pipeline.runner import PipelineResult, run
from pipeline.series_select import SelectionRule
from pipeline.spec import PipelineSpec
from tests.pipeline.test_runner import WHEN, _classification_bundle
from tests.support.dicom_validators import assert_dciodvfy_clean, read_headers, roundtrip
from tests.support.tid1500_checks import check_pacs_triage_sr

SHA = "0" * 64


def _spec(classifier_dir: Path, urgent_probability: float) -> PipelineSpec:
    return PipelineSpec(
        name="test-cls-only",
        version="1",
        selection=SelectionRule(modalities=frozenset({"CT"}), min_slices=16),
        segmentation=None,
        classification=_classification_bundle(classifier_dir),
        thresholds=PriorityThresholds(urgent_probability=urgent_probability),
    )


@pytest.fixture(scope="module")
def classified(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], PipelineResult]:
    clear_bundle_cache()
    out = tmp_path_factory.mktemp("phantom")
    write_phantom_series(out, seed=3, lesions=1, slices=20)
    files = sorted(out.glob("*.dcm"))
    spec = _spec(tmp_path_factory.mktemp("bundles") / "cls", urgent_probability=0.5)
    return files, run(files, spec, input_fingerprint="cls-only-1", analysis_started=WHEN)


def test_a_study_level_probability_sets_the_priority(classified: tuple[list[Path], PipelineResult]) -> None:
    _, result = classified
    findings = result.findings
    assert findings.findings == ()  # nothing segmented, nothing measured
    assert [(c.name, round(c.probability, 2)) for c in findings.classifications] == [("lesion present", 0.73)]
    assert findings.priority.name == "URGENT"
    assert "P(lesion present) 0.73 >= urgent threshold 0.5" in findings.summary
    assert [str(ds.SOPClassUID) for ds in result.datasets] == [
        Comprehensive3DSRStorage
    ]  # no SEG, no key images
    assert result.notes == ()


@pytest.mark.peer
def test_the_classification_only_sr_passes_the_validators(
    classified: tuple[list[Path], PipelineResult],
) -> None:
    files, result = classified
    assert_dciodvfy_clean(result.sr, "classification-only SR")
    check_pacs_triage_sr(
        roundtrip(result.sr), sources=read_headers(files), findings=result.findings, seg=None
    )


def test_config_takes_a_classification_only_pipeline_and_refuses_one_without_bundles() -> None:
    base = {"name": "ct-cls", "allowed_dirs": ["/opt/bundles"]}
    entry = MonaiPipelineConfig.model_validate(
        {**base, "classification": {"path": "/opt/bundles/cls", "sha256": SHA}}
    )
    spec = spec_from_config(entry)
    assert spec.segmentation is None and spec.classification is not None
    with pytest.raises(ValidationError, match="give a segmentation bundle, a classification bundle, or both"):
        MonaiPipelineConfig.model_validate(base)
    with pytest.raises(ValueError, match="needs a segmentation or a classification bundle"):
        PipelineSpec(name="x", version="1", selection=spec.selection, segmentation=None)
