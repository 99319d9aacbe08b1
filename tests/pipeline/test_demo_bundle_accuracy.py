"""The committed demo bundles meet the accuracy targets of issue 4 on fresh, held-out phantoms.

Targets (never loosened): per-lesion Dice >= 0.85 for lesions >= 2 mL; volume error <= 15 % for
lesions >= 4 mL and <= 25 % for 1-4 mL; sensitivity >= 0.95 for lesions >= 1 mL; <= 0.1 false-positive
components of >= 0.5 mL per lesion-free study; AUC >= 0.95 for "a lesion >= 1 mL is present".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.demo import metrics as demo_metrics
from pipeline.demo.training import TRAIN_SEED_BASE, Classifier, Segmenter, demo_runners, evaluate

BUNDLES = Path(pipeline.__file__).parent / "demo" / "bundles"
LESION_SEEDS = range(1000, 1020)  # 3 lesions each, default range (2-30 mL, 40-80 HU, noise 10-20 HU)
LESION_FREE_SEEDS = range(1100, 1110)


def _runners() -> tuple[Segmenter, Classifier]:
    """The bundles as the pipeline runs them: ``pipeline.bundle_runtime`` on CPU, sha256-checked."""
    return demo_runners(BUNDLES)


def test_held_out_seeds_are_not_training_seeds() -> None:
    assert max(*LESION_SEEDS, *LESION_FREE_SEEDS) < TRAIN_SEED_BASE


def test_components_are_six_connected() -> None:
    mask = np.zeros((6, 5, 4), dtype=bool)
    mask[0:2, 0:2, 0] = True  # one block
    mask[2, 2, 1] = True  # touches the block only diagonally: its own component
    mask[4:6, 1:4, 1:3] = True
    mask[5, 3, 3] = True  # face-adjacent to the previous block
    labels, n = demo_metrics.label_components(mask)
    assert n == 3
    assert (labels > 0).sum() == mask.sum() and len(np.unique(labels[mask])) == 3
    assert labels[0, 0, 0] == labels[1, 1, 0] and labels[5, 3, 3] == labels[4, 1, 1]


def test_scoring_of_one_study() -> None:
    truth = np.zeros((20, 20, 10), dtype=np.uint8)
    truth[2:8, 2:8, 2:6] = 1  # 144 voxels
    prediction = np.zeros_like(truth, dtype=bool)
    prediction[2:8, 2:8, 3:6] = True  # 108 of them
    prediction[15:20, 15:20, 0:5] = True  # 125 voxels elsewhere: a false positive
    result = demo_metrics.evaluate_study(0, [0.144], truth, prediction, prediction.astype(float), 0.001, 0.9)
    (lesion,) = result.lesions
    assert lesion.dice == pytest.approx(2 * 108 / (144 + 108)) and lesion.detected
    assert lesion.volume_ml == pytest.approx(0.108) and result.fp_volumes_ml == ()  # 0.125 mL < 0.5 mL
    assert demo_metrics.auc([0.9, 0.8, 0.1], [True, False, False]) == 1.0
    assert demo_metrics.auc([0.5, 0.5], [True, False]) == 0.5


@pytest.mark.slow
def test_demo_bundles_meet_the_targets_on_held_out_phantoms() -> None:
    segment, classify = _runners()
    studies = evaluate(LESION_SEEDS, 3, segment, classify)
    studies += evaluate(LESION_FREE_SEEDS, 0, segment, classify)
    print("\n" + demo_metrics.format_report(studies))
    assert demo_metrics.target_failures(studies) == []
