"""Measurements and triage from a label volume: volumes, components, diameters, centroids, priority.

Conventions: label and probability arrays are on the source grid of the :class:`~pipeline.volume.Volume`,
indexed ``[i, j, k]`` (probabilities ``[C, i, j, k]``); positions are reported in **LPS** patient
coordinates (mm) through ``volume.affine``. Label 0 is background and is never measured.

- Volume: ``voxel count x voxel volume`` always; when probabilities are given, also the sum of the
  label's probabilities x voxel volume (a sub-voxel estimate), and that one is reported
  (:attr:`LabelMeasurement.volume_method` says which).
- Components: 26-connected (:func:`pipeline.morphology.connected_components`).
- Largest diameter: the maximum Feret diameter of the largest component, between voxel centres,
  in mm (so a one-voxel component measures 0 mm; :func:`pipeline.morphology.max_feret_diameter_mm`).
- Centroid: the mean voxel position of all the label's voxels, mapped to LPS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.findings import AlgorithmInfo, Classification, Finding, Findings, VolumeMethod
from pipeline.labels import is_background, segment_codes
from pipeline.morphology import connected_components, max_feret_diameter_mm
from pipeline.volume import Volume
from vocabulary import Priority

if TYPE_CHECKING:
    from pipeline.bundle_runtime import Prediction

__all__ = [
    "LabelMeasurement",
    "PriorityThresholds",
    "classifications",
    "findings_from_prediction",
    "measure_labels",
    "summary_line",
    "triage",
]


@dataclass(frozen=True)
class LabelMeasurement:
    """The measurements of one label (all its connected components together)."""

    label: int
    name: str
    voxel_count: int
    voxel_count_volume_ml: float
    probability_volume_ml: float | None  # None when no probabilities were given
    volume_method: VolumeMethod  # which of the two estimates volume_ml reports
    n_components: int
    largest_diameter_mm: float  # max Feret diameter of the largest component
    centroid_lps: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.volume_method is VolumeMethod.PROBABILITY_SUM and self.probability_volume_ml is None:
            raise ValueError(f"label {self.name!r}: a probability-sum volume needs probabilities")

    @property
    def volume_ml(self) -> float:
        """The reported volume in mL, estimated by :attr:`volume_method`."""
        if self.volume_method is VolumeMethod.PROBABILITY_SUM and self.probability_volume_ml is not None:
            return self.probability_volume_ml
        return self.voxel_count_volume_ml

    def to_finding(self) -> Finding:
        """The :class:`Finding` with its SNOMED codes from :mod:`pipeline.labels`, where known."""
        codes = segment_codes(self.name)
        return Finding(
            label=self.label,
            name=self.name,
            volume_ml=self.volume_ml,
            n_components=self.n_components,
            largest_diameter_mm=self.largest_diameter_mm,
            centroid_lps=self.centroid_lps,
            category=codes.category if codes else None,
            type=codes.type if codes else None,
            finding_site=codes.finding_site if codes else None,
            volume_method=self.volume_method,
        )


@dataclass(frozen=True, kw_only=True)
class PriorityThresholds:
    """When a study becomes URGENT or STAT; a threshold left ``None`` never fires.

    A study is STAT if any counted label has volume >= ``critical_volume_ml`` or any counted
    class has probability >= ``critical_probability``; else URGENT on the ``urgent_*`` thresholds;
    else ROUTINE. ``labels`` names the labels/classes that count (empty: every non-background one).
    """

    urgent_volume_ml: float | None = None
    critical_volume_ml: float | None = None
    urgent_probability: float | None = None
    critical_probability: float | None = None
    labels: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("urgent_volume_ml", "critical_volume_ml"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PriorityThresholds.{name} must be a finite number >= 0, got {value!r}")
        for name in ("urgent_probability", "critical_probability"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"PriorityThresholds.{name} must be in [0, 1], got {value!r}")
        for kind in ("volume_ml", "probability"):
            urgent, critical = getattr(self, f"urgent_{kind}"), getattr(self, f"critical_{kind}")
            if urgent is not None and critical is not None and critical < urgent:
                raise ValueError(
                    f"PriorityThresholds.critical_{kind} ({critical}) is below urgent_{kind} ({urgent})"
                )
        object.__setattr__(self, "labels", frozenset(self.labels))

    def counts(self, name: str) -> bool:
        """Whether label/class ``name`` takes part in triage."""
        return name in self.labels if self.labels else not is_background(name)


# --- measurements --------------------------------------------------------------------------------


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def measure_labels(
    labels: np.ndarray,
    volume: Volume,
    label_names: Sequence[str],
    *,
    probabilities: np.ndarray | None = None,
    volume_method: VolumeMethod | None = None,
) -> tuple[LabelMeasurement, ...]:
    """Measure every non-background label present in ``labels`` ([i, j, k], source grid of ``volume``).

    ``probabilities`` ([C, i, j, k], C = ``len(label_names)``), when given, adds the probability-sum
    volume. ``volume_method`` picks the reported estimate; by default the probability sum when
    probabilities are given, else the voxel count. Labels with no voxel are left out.
    """
    if volume_method is None:
        volume_method = VolumeMethod.VOXEL_COUNT if probabilities is None else VolumeMethod.PROBABILITY_SUM
    if labels.shape != volume.array.shape:
        raise ValueError(f"label volume shape {labels.shape} differs from the volume's {volume.array.shape}")
    if probabilities is not None and probabilities.shape != (len(label_names), *labels.shape):
        raise ValueError(
            f"probabilities shape {probabilities.shape}, expected {(len(label_names), *labels.shape)}"
        )
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(label_names))
    if len(counts) > len(label_names):
        raise ValueError(f"label value {len(counts) - 1} has no name; names are {list(label_names)}")
    voxel_ml = volume.voxel_volume_ml
    out = []
    for label in (int(x) + 1 for x in np.flatnonzero(counts[1:])):
        mask = labels == label
        box = _bounding_box(mask)
        components, n = connected_components(mask[box])
        sizes = np.bincount(components.ravel())[1:]
        largest = components == int(np.argmax(sizes)) + 1
        offset = np.array([s.start for s in box], dtype=np.float64)
        centroid = volume.index_to_patient(np.argwhere(mask[box]).mean(axis=0) + offset)[0]
        prob_ml = None
        if probabilities is not None:
            prob_ml = float(probabilities[label].sum(dtype=np.float64)) * voxel_ml
        out.append(
            LabelMeasurement(
                label=label,
                name=label_names[label],
                voxel_count=int(counts[label]),
                voxel_count_volume_ml=int(counts[label]) * voxel_ml,
                probability_volume_ml=prob_ml,
                volume_method=volume_method,
                n_components=n,
                largest_diameter_mm=max_feret_diameter_mm(largest, volume.affine),
                centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
            )
        )
    return tuple(out)


def classifications(label_names: Sequence[str], probabilities: Sequence[float]) -> tuple[Classification, ...]:
    """One :class:`Classification` per non-background class of a classification bundle."""
    if len(label_names) != len(probabilities):
        raise ValueError(f"{len(probabilities)} probabilities for {len(label_names)} class names")
    return tuple(
        Classification(name=name, probability=float(p))
        for name, p in zip(label_names, probabilities, strict=True)
        if not is_background(name)
    )


# --- triage --------------------------------------------------------------------------------------


def triage(
    findings: Sequence[Finding],
    classes: Sequence[Classification],
    thresholds: PriorityThresholds,
) -> tuple[Priority, str]:
    """The study's priority and the rule that set it (empty for ROUTINE)."""
    for priority, level in ((Priority.STAT, "critical"), (Priority.URGENT, "urgent")):
        volume_limit = getattr(thresholds, f"{level}_volume_ml")
        prob_limit = getattr(thresholds, f"{level}_probability")
        for f in findings:
            if volume_limit is not None and thresholds.counts(f.name) and f.volume_ml >= volume_limit:
                return priority, f"{f.name} {f.volume_ml:.1f} mL >= {level} threshold {volume_limit:g} mL"
        for c in classes:
            if prob_limit is not None and thresholds.counts(c.name) and c.probability >= prob_limit:
                return priority, f"P({c.name}) {c.probability:.2f} >= {level} threshold {prob_limit:g}"
    return Priority.ROUTINE, ""


def summary_line(
    priority: Priority,
    reason: str,
    findings: Sequence[Finding],
    classes: Sequence[Classification],
) -> str:
    """One plain-text line for viewers that show only text."""
    parts = [
        f"{f.name} {f.volume_ml:.1f} mL, {f.n_components} component{'s' if f.n_components != 1 else ''}, "
        f"largest diameter {f.largest_diameter_mm:.1f} mm"
        for f in findings
    ]
    parts += [f"P({c.name}) {c.probability:.2f}" for c in classes]
    head = f"{priority.name} ({reason})" if reason else priority.name
    return f"{head}: {'; '.join(parts) if parts else 'nothing segmented'}"


def findings_from_prediction(
    prediction: Prediction,
    volume: Volume,
    thresholds: PriorityThresholds,
    algorithm: AlgorithmInfo | None = None,
    volume_method: VolumeMethod | None = None,
) -> Findings:
    """Measure a bundle's :class:`~pipeline.bundle_runtime.Prediction` and triage the study.

    ``volume_method`` as in :func:`measure_labels`.
    """
    found: tuple[Finding, ...] = ()
    if prediction.labels is not None:
        measured = measure_labels(
            prediction.labels,
            volume,
            prediction.label_names,
            probabilities=prediction.probabilities,
            volume_method=volume_method,
        )
        found = tuple(m.to_finding() for m in measured)
    classes: tuple[Classification, ...] = ()
    if prediction.class_probabilities is not None:
        classes = classifications(prediction.label_names, prediction.class_probabilities)
    priority, reason = triage(found, classes, thresholds)
    return Findings(
        algorithm=algorithm or prediction.algorithm,
        findings=found,
        classifications=classes,
        priority=priority,
        summary=summary_line(priority, reason, found, classes),
    )
