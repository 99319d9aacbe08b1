"""One study through a registered pipeline outside the service: the ``run``, ``bundle check`` and
``evaluate`` commands share it, and it takes the service's path (registry, MONAI adapter,
``pipeline.runner``), so what it writes is what a worker would send.

The input fingerprint is the service's (``storage.completion``: the SOP Instance UIDs and the sha256
of each file as received), so the result UIDs are those the service would give the same study.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from daemon.pipelines.base import Pipeline
from daemon.pipelines.monai import MonaiPipeline
from storage.completion import digest_of, input_fingerprint
from vocabulary import Priority

if TYPE_CHECKING:  # pipeline.runner imports torch
    from pipeline.runner import PipelineResult

__all__ = ["OfflineInput", "OfflineResult", "analyse", "collect_study", "jsonable", "result_file_names"]


class NoDicomInput(ValueError):
    """None of the paths given holds a DICOM file."""


@dataclass(frozen=True)
class OfflineInput:
    """The DICOM files of one study, the non-DICOM files skipped, and the service's content digest."""

    files: tuple[Path, ...]
    skipped: tuple[Path, ...]
    content_digest: str

    def fingerprint(self, pipeline: str) -> str:
        """The job input fingerprint the service would give this content routed to ``pipeline``."""
        return input_fingerprint(pipeline, self.content_digest)


def _walk(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise NoDicomInput(f"{path} does not exist")
    return found


def collect_study(paths: Sequence[Path]) -> OfflineInput:
    """The DICOM files under ``paths`` (folders searched recursively); NoDicomInput when there is none."""
    files, skipped, instances = [], [], []
    for path in _walk(paths):
        data = path.read_bytes()
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(ds.SOPInstanceUID)
        except (InvalidDicomError, AttributeError, EOFError, ValueError, KeyError, TypeError):
            skipped.append(path)
            continue
        files.append(path)
        instances.append((uid, hashlib.sha256(data).hexdigest()))
    if not files:
        raise NoDicomInput(f"no DICOM files in {', '.join(str(p) for p in paths)}")
    return OfflineInput(tuple(files), tuple(skipped), digest_of(instances))


def jsonable(value: Any) -> Any:
    """Value objects (dataclasses, enums, tuples, paths) as JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True, kw_only=True)
class OfflineResult:
    """What one offline run produced (``detail`` is the MONAI runner's result, when a MONAI pipeline ran)."""

    pipeline: str
    version: str
    input_fingerprint: str
    priority: Priority
    summary: str
    datasets: tuple[Dataset, ...]
    stage_seconds: Mapping[str, float]
    findings: Mapping[str, Any] = field(default_factory=dict)
    detail: PipelineResult | None = None


def analyse(pipeline: Pipeline, study: OfflineInput, *, analysis_started: datetime.datetime) -> OfflineResult:
    """Run ``pipeline`` on ``study``: PermanentError when the input is refused, TransientError for resources."""
    fingerprint = study.fingerprint(pipeline.name)
    if isinstance(pipeline, MonaiPipeline):
        from pipeline import runner  # torch and MONAI

        result = runner.run(
            study.files, pipeline.spec, input_fingerprint=fingerprint, analysis_started=analysis_started
        )
        findings = {
            "study_instance_uid": result.study_instance_uid,
            "series_instance_uid": result.series_instance_uid,
            "selection_reason": result.selection_reason,
            "priority": result.findings.priority.name,
            "summary": result.findings.summary,
            "algorithms": jsonable(result.findings.algorithms),
            "findings": jsonable(result.findings.findings),
            "classifications": jsonable(result.findings.classifications),
            "detections": jsonable(result.findings.detections),  # a detection pipeline's boxes (LPS mm)
            "refused_series": [{"series_instance_uid": u, "reason": r} for u, r in result.refused],
            "notes": list(result.notes),
        }
        return OfflineResult(
            pipeline=pipeline.name,
            version=pipeline.version,
            input_fingerprint=fingerprint,
            priority=result.findings.priority,
            summary=result.findings.summary,
            datasets=result.datasets,
            stage_seconds=dict(result.timings),
            findings=findings,
            detail=result,
        )
    outcome = pipeline.run(list(study.files), input_fingerprint=fingerprint)
    return OfflineResult(
        pipeline=pipeline.name,
        version=pipeline.version,
        input_fingerprint=fingerprint,
        priority=outcome.priority,
        summary=outcome.summary,
        datasets=outcome.datasets,
        stage_seconds=dict(outcome.stage_seconds),
        findings={"priority": outcome.priority.name, "summary": outcome.summary},
    )


_KIND = {
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.88.11": "SR",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.7": "KEY",
    "1.2.840.10008.5.1.4.1.1.88.59": "KOS",
}


def result_file_names(datasets: Sequence[Dataset]) -> list[str]:
    """File names for the result objects: SR.dcm, SEG.dcm, KEY_01.dcm..., KOS.dcm (numbered when repeated)."""
    kinds = [_KIND.get(str(ds.SOPClassUID), "RESULT") for ds in datasets]
    names = []
    for index, kind in enumerate(kinds):
        if kinds.count(kind) == 1 and kind != "KEY":
            names.append(f"{kind}.dcm")
        else:
            names.append(f"{kind}_{kinds[: index + 1].count(kind):02d}.dcm")
    return names


def write_results(datasets: Sequence[Dataset], out: Path) -> list[Path]:
    """Write the result objects as Part 10 files into ``out``, encoded as the worker encodes them."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    from pipeline.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    written = []
    for ds, name in zip(datasets, result_file_names(datasets), strict=True):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        path = out / name
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
