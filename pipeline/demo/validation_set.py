"""A labelled validation set of phantom CT studies, the input ``pacs-triage evaluate`` expects.

Layout written under ``out``::

    cases/<case>/CT0001.dcm ...      one study per case (a phantom series)
    truth/<case>.nii.gz              the lesion label map on the series grid (NIfTI, RAS affine)
    truth/labels.csv                 case,label (1: a lesion is present, 0: lesion-free)

Cases are a pure function of ``seed`` and the options: case ``n`` is phantom seed ``seed + n``, and
which cases hold lesions is a seeded draw of ``round(cases x positive_fraction)`` of them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.demo.phantom import PhantomOptions, write_phantom_series
from pipeline.evaluation.masks import write_nifti_mask

__all__ = ["ValidationCase", "write_validation_set"]

LABELS_CSV = "labels.csv"


@dataclass(frozen=True)
class ValidationCase:
    """One case of the set: its name, phantom seed, lesion count and total lesion volume (mL)."""

    name: str
    seed: int
    lesions: int
    volume_ml: float


def write_validation_set(
    out: Path,
    *,
    cases: int,
    positive_fraction: float = 0.5,
    seed: int = 0,
    slices: int = 64,
    max_lesions: int = 2,
    options: PhantomOptions | None = None,
) -> tuple[ValidationCase, ...]:
    """Write ``cases`` phantom studies with their truth masks and labels CSV; return what was written."""
    if cases < 1:
        raise ValueError(f"a validation set needs at least one case, got {cases}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    if max_lesions < 1:
        raise ValueError(f"max_lesions must be at least 1, got {max_lesions}")
    rng = np.random.default_rng((seed, 7))
    positives = set(rng.permutation(cases)[: round(cases * positive_fraction)].tolist())
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    written = []
    for n in range(cases):
        name = f"case_{n + 1:03d}"
        lesions = int(rng.integers(1, max_lesions + 1)) if n in positives else 0
        case_seed = seed + n
        truth = write_phantom_series(
            out / "cases" / name, seed=case_seed, lesions=lesions, slices=slices, options=options
        )
        label = np.load(out / "cases" / name / "ground_truth_mask.npy")
        write_nifti_mask(out / "truth" / f"{name}.nii.gz", label, np.array(truth.affine))
        written.append(ValidationCase(name, case_seed, lesions, sum(les.volume_ml for les in truth.lesions)))
    with (out / "truth" / LABELS_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "label"])
        for case in written:
            writer.writerow([case.name, int(case.lesions > 0)])
    return tuple(written)
