"""Per-pipeline speed options (issue 15): invert_labels and cpu_bf16 reach the bundle specs and the UIDs.

What they do to labels is measured in tests/pipeline/test_postprocess.py on the real bundle configs.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import MonaiPipelineConfig
from daemon.pipelines.monai import spec_from_config

SHA = "0" * 64


def _entry(**options: object) -> MonaiPipelineConfig:
    return MonaiPipelineConfig.model_validate(
        {
            "name": "ct-liver",
            "allowed_dirs": ["/opt/bundles"],
            "segmentation": {"path": "/opt/bundles/seg", "sha256": SHA},
            "classification": {"path": "/opt/bundles/cls", "sha256": SHA},
            **options,
        }
    )


def test_options_are_off_by_default_and_leave_the_identity_as_it_was() -> None:
    spec = spec_from_config(_entry())
    assert not spec.segmentation.invert_labels and not spec.segmentation.cpu_bf16
    assert spec.segmentation.identity() == {"sha256": SHA, "overrides": {}}  # UIDs of existing pipelines kept


def test_options_reach_the_bundles_and_change_the_result_identity() -> None:
    plain = spec_from_config(_entry())
    fast = spec_from_config(_entry(invert_labels=True, cpu_bf16=True))
    assert fast.segmentation.invert_labels and fast.segmentation.cpu_bf16
    assert fast.classification is not None and fast.classification.cpu_bf16
    assert not fast.classification.invert_labels  # a classifier has no label map to invert
    assert fast.identity() != plain.identity()
    assert spec_from_config(_entry(invert_labels=True)).identity() not in {plain.identity(), fast.identity()}
    assert fast.segmentation.path == Path("/opt/bundles/seg")
