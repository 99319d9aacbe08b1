"""Issue 14 items 4 and 5: ``phantom --cases`` writes a labelled validation set and ``evaluate`` measures
the demo pipeline on it, as the real program (two commands, as in the README).

The report's numbers are checked against an independent computation: Dice and volumes with numpy from
the truth and predicted NIfTI masks read by nibabel, study-level metrics with scikit-learn from the
per-case scores and the labels CSV. Confidence intervals cover their estimates, a refused case is
listed with its reason, the HTML renders (parsed, and in Chromium when it is installed), and a re-run
skips the cases already done.
"""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.demo.phantom import write_phantom_series
from pipeline.evaluation.masks import write_nifti_mask
from tests.support.peers import need_peer
from tests.support.process import clean_env, run_cli

CHROMIUM = "/usr/bin/chromium"


def _cli(home: Path, *args: str) -> tuple[int, str, str]:
    env = clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_LOGGING__LEVEL": "WARNING"})
    done = run_cli(*args, env=env, timeout=900)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("evaluate")
    home, data, report = root / "home", root / "set", root / "report"
    code, stdout, stderr = _cli(
        home, "phantom", "--cases", "3", "--slices", "32", "--seed", "10", "--out", str(data)
    )
    assert code == 0, stdout + stderr
    write_phantom_series(data / "cases" / "too_short", seed=99, lesions=0, slices=8)  # refused: < 16 slices
    # analysed, but its truth mask is on another grid: a failed case, with the reason
    write_phantom_series(data / "cases" / "wrong_grid", seed=98, lesions=0, slices=32)
    write_nifti_mask(data / "truth" / "wrong_grid.nii.gz", np.zeros((10, 10, 10), np.uint8), np.eye(4))
    args = ("evaluate", "demo", str(data / "cases"), "--truth", str(data / "truth"), "--out", str(report))
    code, stdout, stderr = _cli(home, *args, "--jobs", "2", "--bootstrap", "500")
    assert code == 0, stdout + stderr
    return data, report, stdout


@pytest.mark.slow
def test_the_validation_set_has_lesion_free_cases_masks_and_labels(evaluated: tuple[Path, Path, str]) -> None:
    data, _, _ = evaluated
    with (data / "truth" / "labels.csv").open() as handle:
        labels = {row["case"]: row["label"] for row in csv.DictReader(handle)}
    assert sorted(labels) == ["case_001", "case_002", "case_003"]
    assert sorted(labels.values()) == ["0", "1", "1"]  # round(3 x 0.5) positives, the rest lesion-free
    for case, label in labels.items():
        mask = np.asarray(nib.load(data / "truth" / f"{case}.nii.gz").dataobj)
        assert (mask.sum() > 0) == (label == "1")
        assert len(list((data / "cases" / case).glob("*.dcm"))) == 32


@pytest.mark.slow
def test_report_metrics_equal_an_independent_computation(evaluated: tuple[Path, Path, str]) -> None:
    data, report_dir, _ = evaluated
    report = json.loads((report_dir / "report.json").read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert report["counts"] == {
        "cases": 5,
        "ok": 3,
        "refused": 1,
        "failed": 1,
        "with_mask": 3,
        "study_level": 3,
    }

    dices = []
    for name in ("case_001", "case_002", "case_003"):
        case = cases[name]
        truth = np.asarray(nib.load(data / "truth" / f"{name}.nii.gz").dataobj) > 0
        predicted_image = nib.load(report_dir / "cases" / case["predicted_mask"])
        assert np.allclose(predicted_image.affine, nib.load(data / "truth" / f"{name}.nii.gz").affine)
        predicted = np.asarray(predicted_image.dataobj) > 0
        voxel_ml = abs(np.linalg.det(predicted_image.affine[:3, :3])) / 1000
        seg = case["segmentation"]
        if truth.any() or predicted.any():
            dice = 2 * np.sum(truth & predicted) / (truth.sum() + predicted.sum())
            assert seg["dice"] == pytest.approx(dice)
            dices.append(dice)
        assert seg["truth_ml"] == pytest.approx(truth.sum() * voxel_ml)
        assert seg["volume_error_ml"] == pytest.approx((predicted.sum() - truth.sum()) * voxel_ml)
    assert report["segmentation"]["mean_dice"]["value"] == pytest.approx(np.mean(dices))
    assert np.mean(dices) > 0.8  # the demo model finds the phantom lesions

    with (data / "truth" / "labels.csv").open() as handle:
        labels = {row["case"]: row["label"] == "1" for row in csv.DictReader(handle)}
    names = sorted(labels)
    y = np.array([labels[n] for n in names])
    scores = np.array([cases[n]["score"] for n in names])
    called = scores >= report["threshold"]
    metrics = report["study"]["metrics"]
    assert metrics["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, called))
    assert metrics["specificity"]["value"] == pytest.approx(skm.recall_score(~y, ~called))
    assert metrics["ppv"]["value"] == pytest.approx(skm.precision_score(y, called, zero_division=np.nan))
    assert metrics["f1"]["value"] == pytest.approx(skm.f1_score(y, called))
    assert metrics["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, scores))
    tn, fp, fn, tp = skm.confusion_matrix(y, called, labels=[False, True]).ravel()
    c = report["study"]["confusion"]
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (tp, fp, tn, fn)
    for name, estimate in {**metrics, "mean_dice": report["segmentation"]["mean_dice"]}.items():
        if estimate["value"] is not None:
            assert estimate["low"] <= estimate["value"] <= estimate["high"], name


@pytest.mark.slow
def test_refusals_are_listed_with_their_reason(evaluated: tuple[Path, Path, str]) -> None:
    _, report_dir, stdout = evaluated
    report = json.loads((report_dir / "report.json").read_text())
    refused, failed = sorted(report["failures"], key=lambda f: f["case"])
    assert refused["case"] == "too_short" and refused["status"] == "refused"
    assert "8 slices, fewer than 16" in refused["reason"]
    assert "too_short: refused" in stdout
    assert failed["case"] == "wrong_grid" and failed["status"] == "failed"
    assert "not on the grid" in failed["reason"] and "resample it onto the series" in failed["reason"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.mark.slow
def test_the_html_report_renders(evaluated: tuple[Path, Path, str]) -> None:
    _, report_dir, _ = evaluated
    page = _Page()
    page.feed((report_dir / "report.html").read_text())
    text = " ".join(page.text)
    assert page.tags.count("svg") == 3
    for words in (
        "ROC AUC",
        "Confusion matrix",
        "Reliability diagram",
        "Lesion-wise sensitivity",
        "too_short",
    ):
        assert words in text
    need_peer(Path(CHROMIUM).exists(), "Debian's chromium at /usr/bin/chromium")
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            tab = browser.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto((report_dir / "report.html").as_uri())
            assert tab.title() == "Evaluation of demo"
            assert tab.locator("svg.plot").count() == 3
            box = tab.locator("svg.plot").first.bounding_box()
            assert box is not None and box["width"] > 100 and box["height"] > 100
            assert not errors
        finally:
            browser.close()


@pytest.mark.slow
def test_a_rerun_skips_the_cases_already_done(evaluated: tuple[Path, Path, str]) -> None:
    data, report_dir, _ = evaluated
    cached = {p.name: p.stat().st_mtime_ns for p in (report_dir / "cases").glob("*.json")}
    assert len(cached) == 5
    (report_dir / "cases" / "case_002.json").unlink()
    args = ("evaluate", "demo", str(data / "cases"), "--truth", str(data / "truth"), "--out", str(report_dir))
    code, stdout, stderr = _cli(data.parent / "home", *args, "--jobs", "2", "--bootstrap", "500")
    assert code == 0, stdout + stderr
    # case_001, case_003 and the refused one; the failed one is tried again
    assert "3 case(s) unchanged since the last run" in stderr
    after = {p.name: p.stat().st_mtime_ns for p in (report_dir / "cases").glob("*.json")}
    assert after["case_001.json"] == cached["case_001.json"]
    assert after["case_003.json"] == cached["case_003.json"]
    assert json.loads((report_dir / "cases" / "case_002.json").read_text())["status"] == "ok"
    assert after["too_short.json"] == cached["too_short.json"]
    assert after["wrong_grid.json"] > cached["wrong_grid.json"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("echo", "{cases}", "--truth", "{truth}"), "has no model to evaluate"),
        (("demo", "{empty}", "--truth", "{truth}"), "holds no case folders"),
        (("demo", "{cases}", "--truth", "{bad_csv}"), "needs the columns `case` and `label`"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    paths = {"cases": tmp_path / "cases", "truth": tmp_path / "truth", "empty": tmp_path / "empty",
             "bad_csv": tmp_path / "labels.csv"}  # fmt: skip
    (paths["cases"] / "case_001").mkdir(parents=True)
    paths["truth"].mkdir()
    paths["empty"].mkdir()
    paths["bad_csv"].write_text("study,positive\ncase_001,1\n")
    filled = [a.format(**paths) for a in args]
    code, stdout, stderr = _cli(tmp_path / "home", "evaluate", *filled, "--out", str(tmp_path / "report"))
    assert code == 2, stdout + stderr
    assert message in stderr
