"""`bundle check` says which of a bundle's transforms its own settings switch off (issue 14).

lung_nodule_ct_detection ships with ``whether_raw_luna16 = false``: its ``Spacingd`` is
``_disabled_`` and a DICOM series would reach the network at its own spacing. The report must say
so (action "disabled") and flip when the setting is overridden in a copy of the config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.bundle_inspect import describe_bundle
from tests.paths import BUNDLES

LUNG = BUNDLES / "lung_nodule_ct_detection"


def _spacing(bundle: Path) -> tuple[str, str]:
    (item,) = [i for i in describe_bundle(bundle).items if i.detail.startswith("Spacingd")]
    return item.action, item.detail


def test_a_disabled_spacing_is_reported_and_follows_the_bundles_setting(tmp_path: Path) -> None:
    action, detail = _spacing(LUNG)
    assert action == "disabled"
    assert "whether_raw_luna16" in detail and "its own voxel spacing" in detail

    copy = tmp_path / "lung"
    shutil.copytree(LUNG / "configs", copy / "configs")
    config = json.loads((copy / "configs" / "inference.json").read_text())
    config["whether_raw_luna16"] = True
    (copy / "configs" / "inference.json").write_text(json.dumps(config))
    assert _spacing(copy) == ("honoured", "Spacingd")
    loaders = [i for i in describe_bundle(copy).items if i.detail.startswith("LoadImaged")]
    assert [i.action for i in loaders] == ["replaced", "replaced"]  # replaced, disabled or not

    config["whether_raw_luna16"] = "$some_function()"  # not evaluated by this reading: said as such
    (copy / "configs" / "inference.json").write_text(json.dumps(config))
    assert _spacing(copy)[1].startswith("Spacingd, unless '@whether_resampled_luna16")
