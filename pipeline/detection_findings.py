"""Boxes of a detection bundle -> findings and a triage priority (the detection kind's ``measure`` stage).

Which boxes are reported (:class:`DetectionOptions`):

- a box scores at least ``min_score``; ``None`` (the default) keeps every box the bundle itself
  returned, i.e. its own threshold decides (lung nodule: ``score_thresh=0.02`` in ``detector_ops``);
- its class is reported (the pipeline's ``reported``; empty: every class);
- at most ``max_boxes`` of them, highest score first (default 10): the bundle may return up to 300
  (``detections_per_img``), and a report of hundreds of boxes helps nobody; untrained or
  random weights give many low-scoring boxes. The count left out is said in the summary.

Each reported box is numbered per class, highest score first (``"lesion box 1"``), and coded from its
class name (:func:`pipeline.labels.segment_codes`: "nodule" is SNOMED CT Nodule). Triage compares the
highest score of each counted class with the ``*_probability`` thresholds; the ``*_volume_ml``
thresholds do not apply to boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pipeline.findings import Detection, Findings
from pipeline.labels import segment_codes
from pipeline.measure import Measured, PriorityThresholds
from vocabulary import Priority

if TYPE_CHECKING:
    from pipeline.bundle_runtime import Prediction

__all__ = ["DetectionOptions", "detection_triage", "findings_from_detections"]


@dataclass(frozen=True, kw_only=True)
class DetectionOptions:
    """Which of a detection bundle's boxes a pipeline reports (module docstring)."""

    min_score: float | None = None  # None: the bundle's own threshold
    max_boxes: int = 10

    def __post_init__(self) -> None:
        if self.min_score is not None and not (
            math.isfinite(self.min_score) and 0.0 <= self.min_score <= 1.0
        ):
            raise ValueError(f"DetectionOptions.min_score must be in [0, 1] or None, got {self.min_score!r}")
        if not isinstance(self.max_boxes, int) or self.max_boxes < 1:
            raise ValueError(f"DetectionOptions.max_boxes must be an integer >= 1, got {self.max_boxes!r}")

    def identity(self) -> dict[str, object]:
        """What of these options changes a result (all of it)."""
        return {"min_score": self.min_score, "max_boxes": self.max_boxes}


def _coded(box: Detection, index: int) -> Detection:
    codes = segment_codes(box.name)
    if codes is None:
        return replace(box, index=index)
    return replace(
        box, index=index, category=codes.category, type=codes.type, finding_site=codes.finding_site
    )


def detection_triage(boxes: Sequence[Detection], thresholds: PriorityThresholds) -> tuple[Priority, str]:
    """The priority from the highest score per counted class, and the rule that set it (empty: ROUTINE)."""
    best: dict[str, float] = {}
    for box in boxes:
        best[box.name] = max(best.get(box.name, 0.0), box.score)
    for priority, level in ((Priority.STAT, "critical"), (Priority.URGENT, "urgent")):
        limit = getattr(thresholds, f"{level}_probability")
        for name, score in best.items():
            if limit is not None and thresholds.counts(name) and score >= limit:
                return priority, f"{name} box score {score:.2f} >= {level} threshold {limit:g}"
    return Priority.ROUTINE, ""


def _summary(priority: Priority, reason: str, boxes: Sequence[Detection], left_out: int) -> str:
    parts = [
        f"{b.tracking_identifier} score {b.score:.2f}, "
        f"{' x '.join(f'{s:.3g}' for s in b.size_mm)} mm at ({', '.join(f'{c:.1f}' for c in b.centre_lps)}) LPS"
        for b in boxes
    ]
    if left_out:
        parts.append(f"{left_out} more box{'' if left_out == 1 else 'es'} not reported (max_boxes)")
    head = f"{priority.name} ({reason})" if reason else priority.name
    return f"{head}: {'; '.join(parts) if parts else 'nothing detected'}"


def findings_from_detections(
    prediction: Prediction,
    thresholds: PriorityThresholds,
    options: DetectionOptions,
    *,
    reported: frozenset[str] = frozenset(),
) -> Measured:
    """The reported boxes of ``prediction`` (module docstring) as findings, triaged; no lesion map."""
    candidates = [
        b
        for b in prediction.boxes or ()
        if (options.min_score is None or b.score >= options.min_score)
        and (not reported or b.name in reported)
    ]
    candidates.sort(key=lambda b: -b.score)
    kept = candidates[: options.max_boxes]
    numbered: list[Detection] = []
    per_class: dict[str, int] = {}
    for box in kept:
        per_class[box.name] = per_class.get(box.name, 0) + 1
        numbered.append(_coded(box, per_class[box.name]))
    priority, reason = detection_triage(numbered, thresholds)
    findings = Findings(
        algorithm=prediction.algorithm,
        detections=tuple(numbered),
        priority=priority,
        summary=_summary(priority, reason, numbered, len(candidates) - len(kept)),
    )
    return Measured(findings=findings, lesion_map=None)
