"""Issue 14 item 2: ``pacs-triage run`` analyses a study offline through the service's own pipeline code.

The real program in a subprocess, on a phantom CT through the demo pipeline: the result objects are
dciodvfy-clean, findings.json says what the SR says (read back from the file), a study with no usable
series is refused with exit 1 and the reason, and usage errors exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from pipeline.demo.phantom import write_phantom_series
from pipeline.writers.sr_reader import read_sr
from tests.support.dicom_validators import assert_dciodvfy_clean
from tests.support.process import clean_env, run_cli


def _run(home: Path, *args: str, timeout: float = 600.0) -> tuple[int, str, str]:
    env = clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_LOGGING__LEVEL": "WARNING"})
    done = run_cli("run", *args, env=env, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.peer
def test_run_writes_valid_results_and_findings_that_match_the_sr(tmp_path: Path) -> None:
    study = tmp_path / "study"
    truth = write_phantom_series(study, seed=3, lesions=1, slices=32)
    out = tmp_path / "out"
    code, stdout, stderr = _run(tmp_path / "home", "demo", str(study), "--out", str(out))
    assert code == 0, stdout + stderr

    findings = json.loads((out / "findings.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    assert {"select", "load", "inference", "write", "total"} <= set(timings)
    assert findings["study_instance_uid"] == truth.study_instance_uid
    assert findings["skipped_non_dicom"] and not (out / "refused.txt").exists()
    files = [out / r["file"] for r in findings["results"]]
    assert [f.name for f in files][:2] == ["SR.dcm", "SEG.dcm"]
    for path in files:
        assert_dciodvfy_clean(pydicom.dcmread(path), path.name)

    sr = read_sr(pydicom.dcmread(out / "SR.dcm"))
    assert sr.priority is not None and sr.priority.name == findings["priority"]
    assert sr.study_instance_uid == truth.study_instance_uid
    reported = sorted((f.identifier, f.volume_ml) for f in sr.findings)
    written = sorted((f"{f['name']} {f['lesion']}", f["volume_ml"]) for f in findings["findings"])
    assert [r[0] for r in reported] == [w[0] for w in written] and len(written) == 1
    for (_, sr_ml), (_, json_ml) in zip(reported, written, strict=True):
        # the SR states volumes to 3 significant digits (no false precision); findings.json keeps them all
        assert sr_ml == pytest.approx(float(f"{json_ml:.3g}"), rel=1e-9)
    assert sorted((c.name, round(c.probability, 3)) for c in sr.classifications) == sorted(
        (c["name"], round(c["probability"], 3)) for c in findings["classifications"]
    )
    assert sr.summary == findings["summary"]


def test_a_study_without_a_usable_series_is_refused_with_exit_1(tmp_path: Path) -> None:
    study = tmp_path / "study"
    write_phantom_series(study, seed=4, lesions=0, slices=8)  # the demo pipeline needs >= 16 slices
    out = tmp_path / "out"
    code, stdout, stderr = _run(tmp_path / "home", "demo", str(study), "--out", str(out))
    assert code == 1, stdout + stderr
    assert "refused" in stderr and "no series qualifies" in stderr and "8 slices, fewer than 16" in stderr
    assert "8 slices, fewer than 16" in (out / "refused.txt").read_text()
    assert not (out / "SR.dcm").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    home = tmp_path / "home"
    code, _, stderr = _run(home, "no-such-pipeline", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown pipeline 'no-such-pipeline'" in stderr and "demo" in stderr
    code, _, stderr = _run(home, "echo", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no DICOM files" in stderr
    code, _, stderr = _run(home, "echo", str(tmp_path / "empty"))
    assert code == 2 and "--out" in stderr
    code, stdout, _ = _run(home, "--help")
    assert code == 0 and "Exit status" in stdout and "refused" in stdout
