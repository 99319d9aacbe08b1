"""A configured MONAI pipeline's lesion limits: min_lesion_ml and max_key_images reach the spec and the UIDs.

What the cap does to the key images is tested in tests/pipeline/test_key_images.py (the writer) and
tests/pipeline/test_runner.py (the runner's note and the KOS).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.config import MonaiPipelineConfig
from daemon.config.pipelines import DEFAULT_MAX_KEY_IMAGES, DEFAULT_MIN_LESION_ML
from daemon.pipelines.monai import spec_from_config
from pipeline.series_select import SelectionRule
from pipeline.spec import BundleSpec, PipelineSpec

SHA = "0" * 64


def _entry(**options: object) -> MonaiPipelineConfig:
    return MonaiPipelineConfig.model_validate(
        {
            "name": "ct-liver",
            "allowed_dirs": ["/opt/bundles"],
            "segmentation": {"path": "/opt/bundles/seg", "sha256": SHA},
            **options,
        }
    )


def test_a_configured_pipeline_drops_specks_and_caps_key_images_by_default() -> None:
    spec = spec_from_config(_entry())
    assert (spec.min_lesion_ml, spec.max_key_images) == (DEFAULT_MIN_LESION_ML, DEFAULT_MAX_KEY_IMAGES)
    assert DEFAULT_MIN_LESION_ML > 0 and DEFAULT_MAX_KEY_IMAGES >= 1


def test_the_limits_reach_the_spec_and_change_the_result_identity() -> None:
    default = spec_from_config(_entry())
    smaller = spec_from_config(_entry(min_lesion_ml=0.0))
    fewer = spec_from_config(_entry(max_key_images=1))
    assert (smaller.min_lesion_ml, fewer.max_key_images) == (0.0, 1)
    assert len({default.identity(), smaller.identity(), fewer.identity()}) == 3


@pytest.mark.parametrize(
    "options", [{"min_lesion_ml": -0.1}, {"min_lesion_ml": float("nan")}, {"max_key_images": 0}]
)
def test_impossible_limits_are_refused_naming_the_key(options: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match=next(iter(options))):
        _entry(**options)


def test_a_spec_is_uncapped_unless_given_a_cap_of_at_least_one() -> None:
    bundle = BundleSpec(path=Path("/opt/bundles/seg"), sha256=SHA, allowed_dirs=(Path("/opt/bundles"),))
    rule = SelectionRule(modalities=frozenset({"CT"}))
    spec = PipelineSpec(name="p", version="1", selection=rule, segmentation=bundle)
    assert spec.max_key_images is None and spec.min_lesion_ml == 0.0
    capped = PipelineSpec(name="p", version="1", selection=rule, segmentation=bundle, max_key_images=3)
    assert capped.identity() != spec.identity()
    with pytest.raises(ValueError, match="max_key_images of pipeline 'p' must be at least 1"):
        PipelineSpec(name="p", version="1", selection=rule, segmentation=bundle, max_key_images=0)
