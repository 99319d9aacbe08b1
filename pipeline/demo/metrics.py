"""Accuracy of the demo lesion bundles against phantom ground truth: pure functions, no I/O.

Definitions (used by ``pipeline.demo.training``'s report and the accuracy test):

- Components are 6-connected components of the predicted lesion mask on the source grid.
- A component *matches* a ground-truth lesion when it overlaps the lesion's voxel mask; the lesion's
  prediction is the union of its matching components. Per-lesion Dice compares that union with the
  lesion's mask; a lesion is *detected* when its Dice is at least ``DETECTION_DICE``.
- Volumes: ``volume_ml`` counts the voxels of the prediction; ``volume_prob_ml`` sums the lesion
  probability over the prediction grown by one voxel (sub-voxel, partial-volume aware). Errors are
  relative to the analytic lesion volume.
- A false-positive component overlaps no lesion; only those of at least ``FP_MIN_ML`` count.
- AUC is the Mann-Whitney probability that a study with a lesion >= 1 mL scores above one without.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BANDS: tuple[tuple[str, float, float], ...] = (
    ("<1 mL", 0.0, 1.0),
    ("1-4 mL", 1.0, 4.0),
    (">=4 mL", 4.0, np.inf),
)
DETECTION_DICE = 0.1
FP_MIN_ML = 0.5


@dataclass(frozen=True)
class LesionResult:
    """How one ground-truth lesion was segmented."""

    true_ml: float  # analytic volume
    dice: float
    detected: bool
    volume_ml: float  # voxel count of the matched prediction
    volume_prob_ml: float  # probability sum around the matched prediction


@dataclass(frozen=True)
class StudyResult:
    """How one study was segmented and classified."""

    seed: int
    lesions: tuple[LesionResult, ...]
    fp_volumes_ml: tuple[float, ...]  # unmatched components of at least FP_MIN_ML
    probability: float  # classifier output: a lesion is present

    @property
    def positive(self) -> bool:
        """The classification truth: a lesion of at least 1 mL is present."""
        return any(lesion.true_ml >= 1.0 for lesion in self.lesions)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components of a 3-D boolean mask: (int32 labels 1..n, n), by runs along axis 0."""
    m = np.asarray(mask, dtype=bool)
    ni, nj, nk = m.shape
    rows = np.zeros((nj * nk, ni + 2), dtype=np.int8)  # row r = (j, k) = (r // nk, r % nk)
    rows[:, 1:-1] = m.transpose(1, 2, 0).reshape(nj * nk, ni)
    edges = np.diff(rows, axis=1)
    run_row, run_start = np.nonzero(edges == 1)
    run_end = np.nonzero(edges == -1)[1]  # runs are [start, end) and pair up in order
    parent = np.arange(len(run_row))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    first = np.searchsorted(run_row, np.arange(nj * nk + 1))
    for r in np.unique(run_row):
        neighbours = [r + nk] if r + nk < nj * nk else []
        if (r % nk) + 1 < nk:
            neighbours.append(r + 1)
        for a in range(first[r], first[r + 1]):
            for q in neighbours:
                for b in range(first[q], first[q + 1]):
                    if run_start[b] < run_end[a] and run_start[a] < run_end[b]:
                        ra, rb = find(a), find(b)
                        if ra != rb:
                            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(a) for a in range(len(run_row))], dtype=np.int64)
    _, ids = np.unique(roots, return_inverse=True)
    labels = np.zeros(m.shape, dtype=np.int32)
    for a in range(len(run_row)):
        labels[run_start[a] : run_end[a], run_row[a] // nk, run_row[a] % nk] = ids[a] + 1
    return labels, int(ids.max()) + 1 if len(ids) else 0


def _grow(mask: np.ndarray) -> np.ndarray:
    """Dilate by one voxel (6-neighbourhood), without wrapping at the edges."""
    out = mask.copy()
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(lo)] |= mask[tuple(hi)]
        out[tuple(hi)] |= mask[tuple(lo)]
    return out


def _box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by ``margin`` and clipped."""
    box = []
    for axis in range(3):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + 1 + margin))
    return tuple(box)


def evaluate_study(
    seed: int,
    true_volumes_ml: Sequence[float],
    truth: np.ndarray,
    prediction: np.ndarray,
    probability_map: np.ndarray,
    voxel_ml: float,
    probability: float,
) -> StudyResult:
    """Score one study: ``truth`` is the label map (lesion n -> n), ``prediction`` the predicted mask and
    ``probability_map`` the lesion probability, all on the same grid; ``probability`` the classifier's."""
    components, n = label_components(prediction)
    matched: set[int] = set()
    results = []
    for index, true_ml in enumerate(true_volumes_ml, start=1):
        lesion = truth == index
        hits = [int(c) for c in np.unique(components[lesion]) if c]
        matched.update(hits)
        predicted = np.isin(components, hits) if hits else np.zeros_like(lesion)
        overlap = int(np.count_nonzero(predicted & lesion))
        dice = 2 * overlap / max(int(lesion.sum()) + int(predicted.sum()), 1)
        if hits:
            box = _box(predicted)
            prob_ml = float(probability_map[box][_grow(predicted[box])].sum()) * voxel_ml
        else:
            prob_ml = 0.0
        results.append(
            LesionResult(true_ml, dice, dice >= DETECTION_DICE, float(predicted.sum()) * voxel_ml, prob_ml)
        )
    sizes = np.bincount(components.ravel(), minlength=n + 1) * voxel_ml
    fps = tuple(float(sizes[c]) for c in range(1, n + 1) if c not in matched and sizes[c] >= FP_MIN_ML)
    return StudyResult(seed, tuple(results), fps, probability)


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (ties count one half); nan when a class is missing."""
    pos = np.array([s for s, y in zip(scores, labels, strict=True) if y], dtype=float)
    neg = np.array([s for s, y in zip(scores, labels, strict=True) if not y], dtype=float)
    if not len(pos) or not len(neg):
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@dataclass(frozen=True)
class BandRow:
    """Metrics of the lesions whose analytic volume falls in one size band."""

    band: str
    lesions: int
    mean_dice: float
    sensitivity: float
    volume_error: float  # mean |count volume - true| / true
    volume_error_prob: float  # the same for the probability-sum volume


def band_rows(studies: Sequence[StudyResult]) -> tuple[BandRow, ...]:
    """Per-band metrics over all lesions of ``studies``."""
    rows = []
    for name, low, high in BANDS:
        ls = [lz for s in studies for lz in s.lesions if low <= lz.true_ml < high]
        nan = float("nan")
        rows.append(BandRow(
            name, len(ls),
            float(np.mean([lz.dice for lz in ls])) if ls else nan,
            float(np.mean([lz.detected for lz in ls])) if ls else nan,
            float(np.mean([abs(lz.volume_ml - lz.true_ml) / lz.true_ml for lz in ls])) if ls else nan,
            float(np.mean([abs(lz.volume_prob_ml - lz.true_ml) / lz.true_ml for lz in ls])) if ls else nan,
        ))  # fmt: skip
    return tuple(rows)


def fp_per_lesion_free_study(studies: Sequence[StudyResult]) -> float:
    """False-positive components (>= FP_MIN_ML) per study that has no lesion."""
    free = [s for s in studies if not s.lesions]
    return sum(len(s.fp_volumes_ml) for s in free) / len(free) if free else float("nan")


def classification_auc(studies: Sequence[StudyResult]) -> float:
    """AUC of the classifier for "a lesion >= 1 mL is present"."""
    return auc([s.probability for s in studies], [s.positive for s in studies])


def format_report(studies: Sequence[StudyResult]) -> str:
    """The per-band table plus the study-level metrics, as Markdown."""
    lines = [
        "| size band | lesions | mean Dice | sensitivity | volume error (count) | volume error (prob. sum) |",
        "|---|---|---|---|---|---|",
    ]
    for r in band_rows(studies):
        lines.append(f"| {r.band} | {r.lesions} | {r.mean_dice:.3f} | {r.sensitivity:.3f} | "
                     f"{100 * r.volume_error:.1f} % | {100 * r.volume_error_prob:.1f} % |")  # fmt: skip
    free = sum(1 for s in studies if not s.lesions)
    fp_all = sum(len(s.fp_volumes_ml) for s in studies if s.lesions)
    lines += [
        "",
        f"- studies: {len(studies)} ({free} lesion-free)",
        f"- false-positive components >= {FP_MIN_ML} mL per lesion-free study: {fp_per_lesion_free_study(studies):.3f}"
        f" (in studies with lesions: {fp_all} in total)",
        f"- classification AUC (a lesion >= 1 mL is present): {classification_auc(studies):.3f}",
    ]
    return "\n".join(lines)


def target_failures(studies: Sequence[StudyResult]) -> list[str]:
    """Which accuracy targets of the demo bundles (issue 4) are missed; empty when all are met."""
    lesions = [lz for s in studies for lz in s.lesions]
    failures = []

    def check(name: str, value: float, ok: bool) -> None:
        if not ok:
            failures.append(f"{name}: {value:.3f}")

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    dice = mean([lz.dice for lz in lesions if lz.true_ml >= 2.0])
    check("mean Dice of lesions >= 2 mL (target >= 0.85)", dice, dice >= 0.85)
    err4 = mean([abs(lz.volume_prob_ml - lz.true_ml) / lz.true_ml for lz in lesions if lz.true_ml >= 4.0])
    check("volume error of lesions >= 4 mL (target <= 0.15)", err4, err4 <= 0.15)
    err1 = mean(
        [abs(lz.volume_prob_ml - lz.true_ml) / lz.true_ml for lz in lesions if 1.0 <= lz.true_ml < 4.0]
    )
    check("volume error of lesions 1-4 mL (target <= 0.25)", err1, err1 <= 0.25 or np.isnan(err1))
    sens = mean([float(lz.detected) for lz in lesions if lz.true_ml >= 1.0])
    check("sensitivity for lesions >= 1 mL (target >= 0.95)", sens, sens >= 0.95)
    fp = fp_per_lesion_free_study(studies)
    check("FP components per lesion-free study (target <= 0.1)", fp, fp <= 0.1)
    roc = classification_auc(studies)
    check("classification AUC (target >= 0.95)", roc, roc >= 0.95)
    return failures
