"""The built-in stand-in pipelines that need no model.

* ``echo``: reads the headers and answers with a Basic Text SR in the same study that lists
  every series and instance it saw.
* ``noop``: produces nothing (queue benchmarks and tests of the worker loop).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from daemon.pipelines.base import AnalysisOutcome
from pipeline.errors import NoUsableSeries
from pipeline.uids import ResultSeries, derive_uid
from vocabulary import Priority

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ECHO_SERIES_NUMBER = int(ResultSeries.ECHO_SR)  # one table of our series numbers (not the SEG's 9902)
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class NoopPipeline:
    """Produces nothing; the job succeeds with no result."""

    name = "noop"
    version = "1"

    def run(self, study_files: Sequence[Path], *, input_fingerprint: str) -> AnalysisOutcome:
        return AnalysisOutcome(Priority.ROUTINE, f"noop: {len(study_files)} files")


class EchoPipeline:
    """Answers every study with a Basic Text SR listing what it received (no model involved)."""

    name = "echo"
    version = "1"

    def __init__(self, delay_seconds: float = 0.0) -> None:
        self.delay_seconds = delay_seconds

    def run(self, study_files: Sequence[Path], *, input_fingerprint: str) -> AnalysisOutcome:
        headers: list[Dataset] = [dcmread(path, stop_before_pixels=True) for path in study_files]
        if not headers:
            raise NoUsableSeries("the study has no instances to report on")
        if self.delay_seconds:
            time.sleep(self.delay_seconds)  # stands in for model run time (demos, fault tests)
        series: dict[str, list[Dataset]] = {}
        for ds in headers:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
        lines = [f"pacs-triage echo: {len(headers)} instances in {len(series)} series"]
        for uid, items in sorted(series.items()):
            first = items[0]
            lines.append(
                f"series {uid} {first.get('Modality', '')} "
                f"{first.get('SeriesDescription', '')!s}: {len(items)} instances".rstrip()
            )
        summary = "\n".join(lines)
        return AnalysisOutcome(
            Priority.ROUTINE, summary, (self._report(headers, series, summary, input_fingerprint),)
        )

    def _report(
        self, headers: list[Dataset], series: dict[str, list[Dataset]], text: str, input_fingerprint: str
    ) -> Dataset:
        first = headers[0]
        ds = Dataset()
        for keyword in _COPIED:
            if keyword in first:
                ds.add(first[keyword])
            elif keyword != "SpecificCharacterSet":
                setattr(ds, keyword, "")  # type 2 in the SR: present, possibly empty
        base = (input_fingerprint, self.name, self.version, "sr")
        ds.SOPClassUID = BASIC_TEXT_SR
        ds.SOPInstanceUID = derive_uid(*base, "instance")
        ds.SeriesInstanceUID = derive_uid(*base, "series")
        ds.Modality = "SR"
        ds.SeriesNumber = ECHO_SERIES_NUMBER
        ds.SeriesDescription = "pacs-triage echo"
        ds.InstanceNumber = 1
        ds.Manufacturer = "pacs-triage project"
        ds.ReferencedPerformedProcedureStepSequence = []
        ds.PerformedProcedureCodeSequence = []
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        # Deterministic: the content time is the study's, never the clock's, so a re-run is identical.
        ds.ContentDate = first.get("StudyDate") or "19700101"
        ds.ContentTime = first.get("StudyTime") or "000000"
        ds.ValueType = "CONTAINER"
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
        ds.ContinuityOfContent = "SEPARATE"
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = [_code("121111", "DCM", "Summary")]
        item.TextValue = text[:10240]
        ds.ContentSequence = [item]
        ds.CurrentRequestedProcedureEvidenceSequence = [_evidence(str(first.StudyInstanceUID), series)]
        return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _evidence(study_uid: str, series: dict[str, list[Dataset]]) -> Dataset:
    """Hierarchical SOP Instance Reference (PS3.3 C.17.2.1): every instance the report saw."""
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = []
    for uid, items in sorted(series.items()):
        entry = Dataset()
        entry.SeriesInstanceUID = uid
        entry.ReferencedSOPSequence = []
        for ds in sorted(items, key=lambda d: str(d.SOPInstanceUID)):
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            entry.ReferencedSOPSequence.append(ref)
        study.ReferencedSeriesSequence.append(entry)
    return study
