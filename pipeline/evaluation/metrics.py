"""Evaluation metrics: per case (Dice, volume error, lesion-wise matches) and per study (confusion,
ROC AUC, bootstrap confidence intervals, threshold for a target sensitivity, calibration).

Definitions (the report states them too):

- Lesions are the 6-connected components of a binary mask (every non-zero label counts).
- A true lesion is *detected* when the predicted components that overlap it, together, have a Dice
  of at least :data:`DETECTION_DICE` with it. A predicted lesion is a *true positive* when it overlaps
  a true lesion. Lesion-wise sensitivity is per true lesion, PPV per predicted lesion, each in the size
  band of that lesion's own volume.
- Dice is ``2|T∩P| / (|T|+|P|)``; undefined (``None``) when both masks are empty.
- Study level: a study is called positive when its score is at least the threshold. ROC AUC is the
  Mann-Whitney probability that a positive study scores above a negative one (ties count one half).
- Confidence intervals are percentile bootstrap intervals over cases (resampled with replacement,
  seeded, so a report is reproducible); resamples in which a metric is undefined are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DETECTION_DICE",
    "SIZE_BANDS",
    "BandRate",
    "CalibrationBin",
    "CaseScore",
    "Confusion",
    "Estimate",
    "band_rates",
    "bootstrap_ci",
    "calibration",
    "confusion",
    "roc_auc",
    "roc_curve",
    "score_masks",
    "study_metrics",
    "threshold_for_sensitivity",
]

DETECTION_DICE = 0.1
Scores = Sequence[float] | np.ndarray
Labels = Sequence[bool] | np.ndarray
#: Lesion size bands (name, low mL inclusive, high mL exclusive).
SIZE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<1 mL", 0.0, 1.0),
    ("1-4 mL", 1.0, 4.0),
    ("4-20 mL", 4.0, 20.0),
    (">=20 mL", 20.0, math.inf),
)


@dataclass(frozen=True)
class LesionMatch:
    """One lesion (true or predicted), its volume and whether it was matched."""

    volume_ml: float
    matched: bool  # true lesion: detected; predicted lesion: overlaps a true one


@dataclass(frozen=True, kw_only=True)
class CaseScore:
    """How the predicted mask of one case compares with its true mask."""

    dice: float | None  # None: both masks empty
    truth_ml: float
    predicted_ml: float
    true_lesions: tuple[LesionMatch, ...]
    predicted_lesions: tuple[LesionMatch, ...]

    @property
    def volume_error_ml(self) -> float:
        """Predicted minus true volume (mL)."""
        return self.predicted_ml - self.truth_ml

    @property
    def relative_volume_error(self) -> float | None:
        """(predicted - true) / true; None when there is no true volume."""
        return None if self.truth_ml <= 0 else self.volume_error_ml / self.truth_ml


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    labels, n = ndimage.label(mask)  # default structure: 6-connectivity in 3-D
    return labels, int(n)


def score_masks(truth: np.ndarray, predicted: np.ndarray, voxel_ml: float) -> CaseScore:
    """Score a predicted mask against the true one (same grid; non-zero is foreground)."""
    if truth.shape != predicted.shape:
        raise ValueError(f"truth {truth.shape} and prediction {predicted.shape} are not on the same grid")
    t, p = np.asarray(truth) != 0, np.asarray(predicted) != 0
    n_t, n_p = int(t.sum()), int(p.sum())
    dice = None if n_t + n_p == 0 else 2.0 * int(np.count_nonzero(t & p)) / (n_t + n_p)
    t_labels, t_count = _components(t)
    p_labels, p_count = _components(p)
    true_lesions = []
    for index in range(1, t_count + 1):
        lesion = t_labels == index
        hits = [int(c) for c in np.unique(p_labels[lesion]) if c]
        union = np.isin(p_labels, hits) if hits else np.zeros_like(lesion)
        overlap = int(np.count_nonzero(union & lesion))
        d = 2.0 * overlap / max(int(lesion.sum()) + int(union.sum()), 1)
        true_lesions.append(LesionMatch(float(lesion.sum()) * voxel_ml, d >= DETECTION_DICE))
    p_sizes = np.bincount(p_labels.ravel(), minlength=p_count + 1)
    overlapping = {int(c) for c in np.unique(p_labels[t]) if c}
    predicted_lesions = tuple(
        LesionMatch(float(p_sizes[c]) * voxel_ml, c in overlapping) for c in range(1, p_count + 1)
    )
    return CaseScore(
        dice=dice,
        truth_ml=n_t * voxel_ml,
        predicted_ml=n_p * voxel_ml,
        true_lesions=tuple(true_lesions),
        predicted_lesions=predicted_lesions,
    )


@dataclass(frozen=True)
class BandRate:
    """Matched lesions out of all lesions of one size band (sensitivity or PPV)."""

    band: str
    lesions: int
    matched: int

    @property
    def rate(self) -> float | None:
        return None if not self.lesions else self.matched / self.lesions


def band_rates(
    lesions: Sequence[LesionMatch], bands: Sequence[tuple[str, float, float]] = SIZE_BANDS
) -> tuple[BandRate, ...]:
    """Per size band (plus "all"): how many lesions, how many matched."""
    rows = []
    for name, low, high in (*bands, ("all", 0.0, math.inf)):
        inside = [m for m in lesions if low <= m.volume_ml < high]
        rows.append(BandRate(name, len(inside), sum(m.matched for m in inside)))
    return tuple(rows)


# --- study level ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold, and the rates derived from them (None where undefined)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @staticmethod
    def _ratio(a: int, b: int) -> float | None:
        return None if b == 0 else a / b

    @property
    def sensitivity(self) -> float | None:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float | None:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float | None:
        return self._ratio(self.tn, self.tn + self.fn)

    @property
    def f1(self) -> float | None:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def _arrays(scores: Scores, labels: Labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores ({s.shape}) and labels ({y.shape}) must be two lists of the same length")
    return s, y


def confusion(scores: Scores, labels: Labels, threshold: float) -> Confusion:
    """The confusion matrix when a study is called positive at ``score >= threshold``."""
    s, y = _arrays(scores, labels)
    called = s >= threshold
    return Confusion(
        threshold=float(threshold),
        tp=int(np.sum(called & y)),
        fp=int(np.sum(called & ~y)),
        tn=int(np.sum(~called & ~y)),
        fn=int(np.sum(~called & y)),
    )


def roc_auc(scores: Scores, labels: Labels) -> float | None:
    """Area under the ROC curve; None when one class is missing."""
    s, y = _arrays(scores, labels)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    wins = np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])
    return float(wins / (len(pos) * len(neg)))


def roc_curve(scores: Scores, labels: Labels) -> tuple[tuple[float, float, float], ...]:
    """(false positive rate, true positive rate, threshold) from the strictest threshold down."""
    s, y = _arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    points = [(0.0, 0.0, math.inf)]
    for t in sorted(set(s.tolist()), reverse=True):
        c = confusion(s, y, t)
        points.append((c.fp / n_neg if n_neg else 0.0, c.tp / n_pos if n_pos else 0.0, float(t)))
    return tuple(points)


def threshold_for_sensitivity(scores: Scores, labels: Labels, target: float) -> float | None:
    """The highest threshold whose sensitivity is at least ``target``; None without positives."""
    s, y = _arrays(scores, labels)
    if not y.any():
        return None
    for t in sorted(set(s[y].tolist()), reverse=True):
        sens = confusion(s, y, t).sensitivity
        if sens is not None and sens >= target:
            return float(t)
    return float(s[y].min())


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95 % confidence interval (None where undefined)."""

    value: float | None
    low: float | None
    high: float | None


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None],
    n_items: int,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n_items`` cases."""
    if n_items == 0:
        return None, None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = statistic(rng.integers(0, n_items, n_items))
        if v is not None and math.isfinite(v):
            values.append(v)
    if not values:
        return None, None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def study_metrics(
    scores: Scores,
    labels: Labels,
    threshold: float,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Sensitivity, specificity, PPV, NPV, F1 at ``threshold`` and ROC AUC, each with its 95 % CI."""
    s, y = _arrays(scores, labels)

    def at(name: str) -> Callable[[np.ndarray], float | None]:
        return lambda idx: getattr(confusion(s[idx], y[idx], threshold), name)

    statistics: dict[str, Callable[[np.ndarray], float | None]] = {
        name: at(name) for name in ("sensitivity", "specificity", "ppv", "npv", "f1")
    }
    statistics["roc_auc"] = lambda idx: roc_auc(s[idx], y[idx])
    everything = np.arange(len(s))
    out = {}
    for name, fn in statistics.items():
        low, high = bootstrap_ci(fn, len(s), resamples=resamples, seed=seed)
        out[name] = Estimate(fn(everything), low, high)
    return out


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the reliability diagram: scores in [low, high), their mean and the observed rate."""

    low: float
    high: float
    count: int
    mean_score: float | None
    observed: float | None


def calibration(
    scores: Scores, labels: Labels, bins: int = 10
) -> tuple[tuple[CalibrationBin, ...], float | None]:
    """Equal-width bins over [0, 1] (the last one closed) and the expected calibration error."""
    s, y = _arrays(scores, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        mean = float(s[inside].mean()) if n else None
        observed = float(y[inside].mean()) if n else None
        if n and mean is not None and observed is not None:
            ece += n / len(s) * abs(mean - observed)
        rows.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), n, mean, observed))
    return tuple(rows), (ece if len(s) else None)
