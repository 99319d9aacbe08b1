"""``pacs-triage run`` with a multi-series pipeline: brats on four MR series derived from the real MR.

The real program in a subprocess with a config declaring the real brats config (random weights) and
its four channels: the four series give dciodvfy-clean results whose findings.json names every
channel's series in order; without FLAIR the study is refused with exit 1 and a reason naming FLAIR.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from pipeline.bundle_runtime import bundle_sha256
from tests.pipeline.brats_study import CHANNELS, RULES, write_brats_study
from tests.pipeline.test_multiseries import brats_bundle
from tests.support.dicom_validators import assert_dciodvfy_clean
from tests.support.process import clean_env, run_cli


def _config(tmp_path: Path) -> Path:
    bundle = brats_bundle(tmp_path / "bundles")
    channels = "".join(
        f"[[pipelines.monai.channels]]\nname = {json.dumps(n)}\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in RULES[n].items())
        for n in CHANNELS
    )
    path = tmp_path / "pacs-triage.toml"
    path.write_text(
        f"""
home = {json.dumps(str(tmp_path / "home"))}
[[pipelines.monai]]
name = "mr-brats"
modalities = ["MR"]
orientations = ["sagittal"]
allowed_dirs = [{json.dumps(str(bundle.parent))}]
segmentation = {{ path = {json.dumps(str(bundle))}, sha256 = "{bundle_sha256(bundle)}" }}
device = "cpu"
{channels}""",
        encoding="utf-8",
    )
    return path


def _run(config: Path, study: Path, out: Path) -> tuple[int, str]:
    env = clean_env({"PACS_TRIAGE_LOGGING__LEVEL": "WARNING"})
    done = run_cli(
        "run", "mr-brats", str(study), "--out", str(out), "--config", str(config), env=env, timeout=600
    )
    return done.returncode, done.stdout + done.stderr


def test_run_refuses_a_study_without_flair_with_exit_1_naming_it(tmp_path: Path) -> None:
    write_brats_study(tmp_path / "study", channels=("T1c", "T1", "T2"))
    code, output = _run(_config(tmp_path), tmp_path / "study", tmp_path / "out")
    assert code == 1, output
    refused = (tmp_path / "out" / "refused.txt").read_text()
    assert "missing input series FLAIR" in refused and "channel 3 'FLAIR' is missing" in refused, refused
    assert "FLAIR" in output


@pytest.mark.slow
@pytest.mark.peer
def test_run_analyses_four_series_to_valid_results(tmp_path: Path) -> None:
    study = write_brats_study(tmp_path / "study")
    out = tmp_path / "out"
    code, output = _run(_config(tmp_path), tmp_path / "study", out)
    assert code == 0, output
    findings = json.loads((out / "findings.json").read_text())
    series = {
        n: str(pydicom.dcmread(study[n][0], stop_before_pixels=True).SeriesInstanceUID) for n in CHANNELS
    }
    assert findings["series_instance_uid"] == series["T1c"]
    reason = findings["selection_reason"]
    at = [reason.index(f"channel {i} {n!r}: series {series[n]}") for i, n in enumerate(CHANNELS)]
    assert at == sorted(at), reason
    files = [out / r["file"] for r in findings["results"]]
    assert [f.name for f in files][:2] == ["SR.dcm", "SEG.dcm"]
    for path in files:
        assert_dciodvfy_clean(pydicom.dcmread(path), path.name)
