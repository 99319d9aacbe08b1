"""Issue 14 item 3: ``pacs-triage bundle check`` on a real Model Zoo bundle (spleen, shipped without
weights) with random weights, on a small phantom CT; pins and missing weights reported with exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from pipeline.demo.bundle import DEMO_BUNDLE_DIR, SEGMENTATION_BUNDLE
from pipeline.demo.phantom import PhantomOptions, write_phantom_series
from tests.paths import BUNDLES
from tests.support.dicom_validators import assert_dciodvfy_clean
from tests.support.process import clean_env, run_cli

SPLEEN = BUNDLES / "spleen_ct_segmentation"


def _check(home: Path, *args: str) -> tuple[int, str, str]:
    env = clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_LOGGING__LEVEL": "ERROR"})
    done = run_cli("bundle", "check", *args, env=env, timeout=900)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    write_phantom_series(
        out, seed=1, lesions=1, slices=32, options=PhantomOptions(matrix=96, pixel_spacing_mm=2.0)
    )
    return out


@pytest.mark.slow
@pytest.mark.peer
def test_spleen_runs_unchanged_with_random_weights(tmp_path: Path, small_ct: Path) -> None:
    assert SPLEEN.is_dir(), f"{SPLEEN}: the shared Model Zoo bundles are missing"
    out = tmp_path / "check"
    code, stdout, stderr = _check(
        tmp_path / "home", str(SPLEEN), "--random-weights", "--input", str(small_ct), "--out", str(out)
    )
    assert code == 0, stdout + stderr
    for line in (
        "replaced   preprocessing#transforms#0: LoadImaged -> Identityd",
        "replaced   postprocessing#transforms#3: SaveImaged -> Identityd",
        "honoured   network_def: UNet",
        "honoured   inferer: SlidingWindowInferer",
        "removed    checkpointloader",
        "weights models/model.pt (md5 from large_files.yml): absent",
    ):
        assert line in stdout, stdout
    report = json.loads((out / "check.json").read_text())
    assert report["problems"] == []
    assert report["bundle"]["labels"] == ["background", "spleen"]
    run = report["run"]
    assert run["seconds"] > 0 and run["peak_rss_mib"] > 0 and run["stage_seconds"]["inference"] > 0
    assert run["results"][0] == "SR.dcm"
    for name in run["results"]:
        assert_dciodvfy_clean(pydicom.dcmread(out / name), name)
    # the original bundle was not touched: the random weights live in a copy under --out
    assert not (SPLEEN / "models").exists()
    assert (out / "random-weights" / SPLEEN.name / "models" / "model.pt").is_file()


def test_a_bundle_without_weights_is_not_deployable(tmp_path: Path) -> None:
    code, stdout, stderr = _check(tmp_path / "home", str(SPLEEN), "--out", str(tmp_path / "o"))
    assert code == 1, stdout + stderr
    assert "has no weights in models/" in stderr and "--random-weights" in stderr
    assert json.loads((tmp_path / "o" / "check.json").read_text())["run"] is None


@pytest.mark.slow
def test_pins_are_verified(tmp_path: Path, small_ct: Path) -> None:
    bundle = DEMO_BUNDLE_DIR / SEGMENTATION_BUNDLE
    out = tmp_path / "check"
    args = (str(bundle), "--input", str(small_ct), "--out", str(out), "--sha256", "0" * 64)
    code, stdout, stderr = _check(tmp_path / "home", *args)
    assert code == 1, stdout + stderr
    pins = {p["pinned_by"]: p["matches"] for p in json.loads((out / "check.json").read_text())["pins"]}
    assert pins == {"--sha256": False, str(DEMO_BUNDLE_DIR / "PINS.json"): True}
    assert "sha256 pinned by --sha256 is 0000" in stderr
    assert (out / "SR.dcm").is_file()  # the run itself still happened and is reported
