"""Read back what a pacs-triage TID 1500 SR says: findings, classifications, priority, evidence.

The inverse of ``sr_writer`` for the values a person or a test compares with the truth, taken from
the encoded content tree as a PACS stores it (no highdicom object needed). It reads the tree by
concept codes (``pipeline/codes.py``), so it also reads the same measurements from another
writer's TID 1500 report.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code as PydicomCode

from pipeline import codes
from pipeline.findings import Code
from vocabulary import Priority

__all__ = ["ReportedClassification", "ReportedFinding", "SrReport", "read_sr"]

_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")


@dataclass(frozen=True)
class ReportedFinding:
    """One measurement group with a volume: a segmented label."""

    name: str  # tracking identifier (the bundle's label name)
    volume_ml: float
    diameter_mm: float | None


@dataclass(frozen=True)
class ReportedClassification:
    name: str
    probability: float


@dataclass(frozen=True)
class SrReport:
    """The values of one report."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    findings: tuple[ReportedFinding, ...]
    classifications: tuple[ReportedClassification, ...]
    priority: Priority | None
    summary: str
    evidence: frozenset[str]  # SOP Instance UIDs of CurrentRequestedProcedureEvidenceSequence

    def total_volume_ml(self, name: str | None = None) -> float:
        """Sum of the reported volumes (of the findings called ``name``, when given)."""
        return sum(f.volume_ml for f in self.findings if name is None or f.name == name)


def _key(code: Code | PydicomCode) -> tuple[str, str]:
    if isinstance(code, Code):
        return (code.value, code.scheme)
    return (str(code.value), str(code.scheme_designator))


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _number(item: Dataset) -> float | None:
    seq = item.get("MeasuredValueSequence")
    return float(seq[0].NumericValue) if seq else None


def read_sr(ds: Dataset) -> SrReport:
    """The findings, classifications, priority and evidence of a TID 1500 SR."""
    findings: list[ReportedFinding] = []
    classes: list[ReportedClassification] = []
    priority: Priority | None = None
    by_code = {_key(code): p for p, code in codes.PRIORITY_VALUES.items()}
    for group in (i for i in _walk(ds) if _concept(i) == _MEASUREMENT_GROUP):
        items = list(group.get("ContentSequence", []))
        name = next((str(i.TextValue) for i in items if _concept(i) == _TRACKING_IDENTIFIER), "")
        values = {_concept(i): _number(i) for i in items if i.get("ValueType") == "NUM"}
        volume = values.get(_key(codes.VOLUME))
        if volume is not None:
            findings.append(ReportedFinding(name, volume, values.get(_key(codes.DIAMETER))))
        probability = values.get(_key(codes.PROBABILITY))
        if probability is not None:
            classes.append(ReportedClassification(name.removesuffix(" (classification)"), probability))
        for item in items:
            if _concept(item) == _key(codes.PRIORITY) and item.get("ConceptCodeSequence"):
                value = item.ConceptCodeSequence[0]
                priority = by_code.get((str(value.CodeValue), str(value.CodingSchemeDesignator)))
    summary = next(
        (str(i.TextValue) for i in ds.get("ContentSequence", []) if _concept(i) == _key(codes.SUMMARY)), ""
    )
    evidence = frozenset(
        str(ref.ReferencedSOPInstanceUID)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedSOPSequence", [])
    )
    return SrReport(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        findings=tuple(findings),
        classifications=tuple(classes),
        priority=priority,
        summary=summary,
        evidence=evidence,
    )
