"""Detection bundles through the CLI (issue 14): a ``[[pipelines.monai]]`` entry with ``detection`` runs
lung_nodule_ct_detection (unchanged, random weights) with ``pacs-triage run``, and ``pacs-triage bundle
check`` runs a detection bundle as one (the bundle's own kind), both to dciodvfy-clean results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from daemon.config import load_config
from daemon.pipelines.monai import spec_from_config
from pipeline.bundle_config import build_parser
from pipeline.bundle_pins import read_bundle_files
from pipeline.bundle_runtime import bundle_sha256
from pipeline.demo.phantom import PhantomOptions, write_phantom_series
from pipeline.detection import detection_build
from tests.paths import BUNDLES
from tests.support.dicom_validators import assert_dciodvfy_clean
from tests.support.process import clean_env, run_cli

LUNG = BUNDLES / "lung_nodule_ct_detection"


def _cli(home: Path, *args: str) -> tuple[int, str, str]:
    env = clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_LOGGING__LEVEL": "ERROR"})
    done = run_cli(*args, env=env, timeout=600)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    write_phantom_series(
        out, seed=5, lesions=0, slices=16, options=PhantomOptions(matrix=64, pixel_spacing_mm=1.0)
    )
    return out


def _bundle_with_random_weights(root: Path) -> Path:
    """The unchanged bundle plus seeded random weights (as tests/pipeline/test_detection.py)."""
    path = Path(shutil.copytree(LUNG, root / LUNG.name))
    files = read_bundle_files(path)
    with detection_build(files):
        parser = build_parser(files, {"whether_raw_luna16": True}, torch.device("cpu"))
        torch.manual_seed(0)
        network = parser.get_parsed_content("network_def")
    (path / "models").mkdir()
    torch.save(network.state_dict(), path / "models" / "model.pt")
    return path


@pytest.mark.peer
def test_a_configured_detection_pipeline_runs_offline(tmp_path: Path, study: Path) -> None:
    bundle = _bundle_with_random_weights(tmp_path / "bundles")
    config = tmp_path / "pacs-triage.toml"
    config.write_text(
        f"""
[[pipelines.monai]]
name = "ct-lung-nodules"
allowed_dirs = ["{tmp_path / "bundles"}"]
min_slices = 8
detection = {{ path = "{bundle}", sha256 = "{bundle_sha256(bundle)}", overrides = {{ "whether_raw_luna16" = true }} }}
min_score = 0.05
max_boxes = 3
device = "cpu"
thresholds = {{ urgent_probability = 0.99 }}
""",
        encoding="utf-8",
    )
    entry = load_config(config, environ={}).pipelines.monai[0]
    spec = spec_from_config(entry)
    assert spec.detection is not None and spec.segmentation is None and spec.classification is None
    assert (spec.detection_options.min_score, spec.detection_options.max_boxes) == (0.05, 3)

    out = tmp_path / "out"
    code, stdout, stderr = _cli(
        tmp_path / "home", "run", "ct-lung-nodules", str(study), "--out", str(out), "--config", str(config)
    )
    assert code == 0, stdout + stderr
    findings = json.loads((out / "findings.json").read_text())
    boxes = findings["detections"]
    assert 1 <= len(boxes) <= 3 and all(b["score"] >= 0.05 for b in boxes)
    assert findings["findings"] == [] and findings["priority"] == "ROUTINE"  # no score reaches 0.99
    files = [out / r["file"] for r in findings["results"]]
    assert files[0].name == "SR.dcm" and not (out / "SEG.dcm").exists()
    for path in files:
        assert_dciodvfy_clean(pydicom.dcmread(path), path.name)
    sr = pydicom.dcmread(out / "SR.dcm")
    ellipsoids = [
        item
        for container in sr.ContentSequence
        if container.ValueType == "CONTAINER"
        for group in container.get("ContentSequence", [])
        for item in group.get("ContentSequence", [])
        if item.ValueType == "SCOORD3D" and item.GraphicType == "ELLIPSOID"
    ]
    assert len(ellipsoids) == len(boxes)


@pytest.mark.peer
def test_bundle_check_runs_a_detection_bundle_as_one(tmp_path: Path, study: Path) -> None:
    out = tmp_path / "check"
    code, stdout, stderr = _cli(
        tmp_path / "home",
        "bundle",
        "check",
        str(LUNG),
        "--random-weights",
        "--input",
        str(study),
        "--override",
        "whether_raw_luna16=true",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert code == 0, stdout + stderr
    assert "; detection; input CT" in stdout
    assert "honoured   detector_ops: evaluated once the network is built" in stdout
    assert "honoured   inferer: scripts.detection_inferer.RetinaNetInferer" in stdout
    report = json.loads((out / "check.json").read_text())
    assert report["problems"] == [] and report["bundle"]["kind"] == "detection"
    boxes = report["run"]["findings"]["detections"]
    assert 1 <= len(boxes) <= 10 and all(
        b["score"] >= 0.02 for b in boxes
    )  # its threshold; max_boxes' default
    results = report["run"]["results"]
    assert results[0] == "SR.dcm" and "SEG.dcm" not in results and "KOS.dcm" in results
    for name in results:
        assert_dciodvfy_clean(pydicom.dcmread(out / name), name)
