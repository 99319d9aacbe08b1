"""One validation case through a pipeline, scored against its truth: what ``pacs-triage evaluate`` runs
per case (in a worker process). The run is the offline one (:mod:`daemon.pipelines.offline`), so the
model sees exactly what the service would give it; the scoring is :mod:`pipeline.evaluation.metrics`.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.pipelines.base import Pipeline
from daemon.pipelines.monai import MonaiPipeline
from daemon.pipelines.offline import OfflineInput, analyse, jsonable
from pipeline.errors import PermanentError, PipelineError

__all__ = ["CaseTask", "case_key", "evaluate_case", "study_score"]


@dataclass(frozen=True)
class CaseTask:
    """One case: its name, its study's files, and its truth mask (NIfTI or DICOM SEG) when there is one."""

    name: str
    study: OfflineInput
    mask: Path | None


def case_key(pipeline: Pipeline, task: CaseTask) -> str:
    """What a cached case result depends on: the pipeline's identity, the study content, the truth mask."""
    identity = pipeline.spec.identity() if isinstance(pipeline, MonaiPipeline) else pipeline.version
    mask = "" if task.mask is None else hashlib.sha256(task.mask.read_bytes()).hexdigest()
    text = f"pacs-triage/evaluate-case/v1\n{pipeline.name}\n{identity}\n{task.study.content_digest}\n{mask}"
    return hashlib.sha256(text.encode()).hexdigest()


def study_score(pipeline: Pipeline, findings: Any) -> tuple[float, str]:
    """The study-level score: the highest probability of a class that counts for triage, else whether a
    counted lesion was found (1.0 or 0.0)."""
    from pipeline.findings import Findings

    if not isinstance(findings, Findings) or not isinstance(pipeline, MonaiPipeline):
        return 0.0, "no findings"
    thresholds = pipeline.spec.thresholds
    probabilities = [c.probability for c in findings.classifications if thresholds.counts(c.name)]
    if probabilities:
        return max(probabilities), "classification probability"
    found = any(thresholds.counts(f.name) for f in findings.findings)
    return (1.0 if found else 0.0), "lesion found (no classifier)"


def _series_files(files: tuple[Path, ...], series_uid: str) -> list[Path]:
    from pydicom import dcmread

    return [
        p
        for p in files
        if str(dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        == series_uid
    ]


def _masks(task: CaseTask, result: Any, mask_out: Path | None) -> tuple[np.ndarray | None, np.ndarray, float]:
    """(truth mask or None, predicted mask, voxel volume in mL) on the analysed series' grid; the
    predicted mask is also written to ``mask_out`` (NIfTI) when given."""
    from pydicom import dcmread

    from pipeline.evaluation.masks import mask_from_nifti, mask_from_seg, write_nifti_mask
    from pipeline.geometry import load_volume

    volume = load_volume(_series_files(task.study.files, result.series_instance_uid))
    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    predicted = (
        np.zeros(volume.array.shape, dtype=np.uint16)
        if result.seg is None
        else mask_from_seg(result.seg, volume)
    )
    if mask_out is not None:
        write_nifti_mask(mask_out, np.minimum(predicted, 255), volume.affine)
    truth = None
    if task.mask is not None:
        if task.mask.name.endswith((".nii", ".nii.gz")):
            truth = mask_from_nifti(task.mask, volume)
        else:
            truth = mask_from_seg(dcmread(task.mask), volume)
    return truth, predicted, voxel_ml


def evaluate_case(
    pipeline: Pipeline,
    task: CaseTask,
    *,
    key: str,
    analysis_started: datetime.datetime,
    mask_out: Path | None = None,
) -> dict[str, Any]:
    """Run and score one case; a refusal or failure is a record too (status and reason), never raised.

    ``mask_out``: where to write the predicted mask (NIfTI, on the series grid) for inspection.
    """
    from pipeline.evaluation.metrics import score_masks

    record: dict[str, Any] = {
        "case": task.name,
        "key": key,
        "pipeline": pipeline.name,
        "version": pipeline.version,
    }
    try:
        result = analyse(pipeline, task.study, analysis_started=analysis_started)
    except PermanentError as exc:
        return {**record, "status": "refused", "reason": str(exc)}
    except PipelineError as exc:
        return {**record, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    detail = result.detail
    score, source = study_score(pipeline, None if detail is None else detail.findings)
    record.update(
        status="ok",
        priority=result.priority.name,
        summary=result.summary,
        score=score,
        score_source=source,
        stage_seconds=dict(result.stage_seconds),
        series_instance_uid=None if detail is None else detail.series_instance_uid,
    )
    if detail is None:
        return record
    try:
        truth, predicted, voxel_ml = _masks(task, detail, mask_out)
    except (ValueError, PipelineError, OSError) as exc:
        return {**record, "status": "failed", "reason": f"truth mask of {task.name}: {exc}"}
    record["predicted_ml"] = float(np.count_nonzero(predicted)) * voxel_ml
    if mask_out is not None:
        record["predicted_mask"] = mask_out.name
    if truth is not None:
        scored = score_masks(truth, predicted, voxel_ml)
        record["segmentation"] = {
            **jsonable(scored),
            "volume_error_ml": scored.volume_error_ml,
            "relative_volume_error": scored.relative_volume_error,
        }
    return record
