"""Issue 14 item 4: the evaluation metrics equal an independent computation (scikit-learn, numpy),
bootstrap intervals cover their point estimates, masks land on the series grid, the HTML parses."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from pipeline.evaluation.masks import mask_from_nifti, write_nifti_mask
from pipeline.evaluation.metrics import (
    band_rates,
    calibration,
    confusion,
    roc_auc,
    score_masks,
    study_metrics,
    threshold_for_sensitivity,
)
from pipeline.evaluation.report import build_report, render_html
from pipeline.volume import InstanceRef, Volume


def _study(seed: int, n: int = 40, *, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]  # both classes, always
    scores = np.clip(rng.normal(np.where(labels, 0.65, 0.35), 0.2), 0, 1)
    return (scores.round(2) if ties else scores), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_study_level_metrics_equal_scikit_learn(seed: int) -> None:
    scores, labels = _study(seed)
    threshold = 0.5
    called = scores >= threshold
    tn, fp, fn, tp = skm.confusion_matrix(labels, called, labels=[False, True]).ravel()
    c = confusion(scores, labels, threshold)
    assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
    assert c.sensitivity == pytest.approx(skm.recall_score(labels, called))
    assert c.specificity == pytest.approx(skm.recall_score(~labels, ~called))
    assert c.ppv == pytest.approx(skm.precision_score(labels, called))
    assert c.npv == pytest.approx(skm.precision_score(~labels, ~called))
    assert c.f1 == pytest.approx(skm.f1_score(labels, called))
    assert roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores))

    estimates = study_metrics(scores, labels, threshold, resamples=500, seed=seed)
    assert estimates["roc_auc"].value == pytest.approx(skm.roc_auc_score(labels, scores))
    for name, e in estimates.items():
        assert e.value is not None and e.low is not None and e.high is not None, name
        assert e.low <= e.value <= e.high, f"{name}: CI [{e.low}, {e.high}] misses {e.value}"
        assert e.high - e.low > 0, f"{name}: a degenerate interval on a noisy sample"


def test_threshold_for_a_target_sensitivity_is_the_highest_that_reaches_it() -> None:
    scores, labels = _study(5)
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    t = threshold_for_sensitivity(scores, labels, 0.9)
    assert t is not None
    reaching = [th for th, sens in zip(thresholds, tpr, strict=True) if sens >= 0.9 and math.isfinite(th)]
    assert t == pytest.approx(max(reaching))
    assert (confusion(scores, labels, t).sensitivity or 0) >= 0.9


def test_calibration_bins_equal_scikit_learn() -> None:
    # no score on a bin edge: scikit-learn closes bins on the right, ours on the left (both documented)
    scores, labels = _study(3, n=200, ties=False)
    bins, ece = calibration(scores, labels, bins=5)
    observed, predicted = calibration_curve(labels, scores, n_bins=5, strategy="uniform")
    filled = [b for b in bins if b.count]
    assert [b.observed for b in filled] == pytest.approx(list(observed))
    assert [b.mean_score for b in filled] == pytest.approx(list(predicted))
    expected_ece = sum(b.count / len(scores) * abs(b.mean_score - b.observed) for b in filled)  # type: ignore[operator]
    assert ece == pytest.approx(expected_ece)


def test_dice_volumes_and_lesion_matching_on_known_masks() -> None:
    truth = np.zeros((30, 30, 30), dtype=np.uint8)
    truth[2:8, 2:8, 2:8] = 1  # 216 voxels, found
    truth[20:24, 20:24, 20:24] = 2  # 64 voxels, missed
    predicted = np.zeros_like(truth)
    predicted[3:8, 2:8, 2:8] = 1  # 180 voxels inside the first lesion
    predicted[12:14, 2:4, 2:4] = 1  # 8 voxels, a false positive
    voxel_ml = 0.5
    score = score_masks(truth, predicted, voxel_ml)
    t, p = truth > 0, predicted > 0
    assert score.dice == pytest.approx(2 * np.sum(t & p) / (t.sum() + p.sum()))
    assert score.truth_ml == pytest.approx(280 * voxel_ml)
    assert score.volume_error_ml == pytest.approx((188 - 280) * voxel_ml)
    assert sorted((m.volume_ml, m.matched) for m in score.true_lesions) == [(32.0, False), (108.0, True)]
    assert sorted((m.volume_ml, m.matched) for m in score.predicted_lesions) == [(4.0, False), (90.0, True)]
    everything = band_rates(score.true_lesions)[-1]
    assert (everything.band, everything.lesions, everything.matched) == ("all", 2, 1)
    assert score_masks(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 1.0).dice is None


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, 1), (1, -1, -1)])
def test_a_nifti_mask_lands_on_the_series_grid(tmp_path: Path, flip: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    label = (rng.random((6, 5, 4)) > 0.7).astype(np.uint8)
    affine = np.array([[0.8, 0, 0, -100], [0, 0.8, 0, -120], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    volume = Volume(np.zeros(label.shape, np.float32), affine, "1.2.3", "1.2.3.4", "1.2.3.5", "CT",
                    tuple(InstanceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.6.{k}") for k in range(4)))  # fmt: skip
    # the same mask stored with flipped axes (and the affine that says so)
    stored, stored_affine = label.copy(), affine.copy()
    for axis, sign in enumerate(flip):
        if sign < 0:
            stored = np.flip(stored, axis)
            stored_affine[:3, 3] += stored_affine[:3, axis] * (label.shape[axis] - 1)
            stored_affine[:3, axis] *= -1
    write_nifti_mask(tmp_path / "m.nii.gz", stored, stored_affine)
    assert np.array_equal(mask_from_nifti(tmp_path / "m.nii.gz", volume), label)
    write_nifti_mask(tmp_path / "off.nii.gz", label, affine @ np.diag([1.5, 1, 1, 1]))
    with pytest.raises(ValueError, match="not on the grid"):
        mask_from_nifti(tmp_path / "off.nii.gz", volume)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_report_renders_with_plots_and_lists_refusals() -> None:
    scores, labels = _study(7, n=12)
    records = [
        {"case": f"c{n}", "status": "ok", "score": float(s), "priority": "ROUTINE",
         "segmentation": {"dice": 0.8, "truth_ml": 1.0 if y else 0.0, "predicted_ml": 1.1, "volume_error_ml": 0.1,
                          "true_lesions": [{"volume_ml": 1.0, "matched": True}] if y else [], "predicted_lesions": []}}
        for n, (s, y) in enumerate(zip(scores, labels, strict=True))
    ] + [{"case": "bad", "status": "refused", "reason": "no usable series <MR>"}]  # fmt: skip
    report = build_report(records, labels={}, pipeline="demo", threshold=0.5, threshold_source="test",
                          target_sensitivity=0.9, generated_at="2026-12-03 10:00:00", resamples=200)  # fmt: skip
    assert report["study"]["metrics"]["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert report["failures"] == [{"case": "bad", "status": "refused", "reason": "no usable series <MR>"}]
    page = _Collect()
    page.feed(render_html(report))
    text = " ".join(page.text)
    assert page.tags.count("svg") == 3  # ROC, reliability diagram, Dice per case
    for heading in ("Study level", "Confusion matrix", "Reliability diagram", "Failures and refusals"):
        assert heading in text
    assert "no usable series <MR>" in text  # escaped in the page, intact once parsed


def test_a_third_party_seg_as_truth_lands_where_highdicom_puts_it() -> None:
    """dcmqi's liver SEG (another writer's, frames by source instance) on the CT grid [i, j, k]."""
    import highdicom as hd
    import pydicom

    from pipeline.evaluation.masks import mask_from_seg
    from tests.paths import TESTDATA
    from tests.support.dicom_validators import read_headers, volume_from_headers

    folder = TESTDATA / "sr_examples" / "dcmqi_liver_seg"
    volume = volume_from_headers(read_headers(sorted(folder.glob("ct_0*.dcm"))))
    uids = [ref.sop_instance_uid for ref in volume.source_instances]
    reference = hd.seg.segread(folder / "liver_seg.dcm")
    expected = reference.get_pixels_by_source_instance(
        uids, segment_numbers=[1], ignore_spatial_locations=True
    )
    expected = np.transpose(expected[..., 0], (2, 1, 0))  # (frames, rows, columns) -> [i, j, k]
    mask = mask_from_seg(pydicom.dcmread(folder / "liver_seg.dcm"), volume)
    assert expected.any()
    np.testing.assert_array_equal(mask > 0, expected > 0)
