"""Read back what a pacs-triage TID 1500 SR says: lesions, classifications, boxes, priority, evidence.

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

__all__ = ["ReportedBox", "ReportedClassification", "ReportedFinding", "SrReport", "read_sr"]

_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")
_TRACKING_UID = ("112040", "DCM")
_ALGORITHM_NAME = ("111001", "DCM")
_METHOD = ("370129005", "SCT")  # TID 300 "Measurement Method"


@dataclass(frozen=True)
class ReportedFinding:
    """One measurement group with a volume: a lesion."""

    identifier: str  # tracking identifier, e.g. "lesion 2"
    volume_ml: float  # the voxels the SEG shows (method 126030)
    diameter_mm: float | None
    probability_volume_ml: float | None = None
    centroid_lps: tuple[float, float, float] | None = None  # SCOORD3D POINT, mm
    tracking_uid: str = ""
    algorithm_name: str = ""

    @property
    def name(self) -> str:
        """The label the lesion belongs to: the identifier without its lesion number."""
        head, _, tail = self.identifier.rpartition(" ")
        return head if head and tail.isdigit() else self.identifier


@dataclass(frozen=True)
class ReportedBox:
    """One measurement group with a SCOORD3D ELLIPSOID: a detection box (``sr_boxes``)."""

    identifier: str  # tracking identifier, e.g. "nodule box 1"
    score: float | None  # NUM Probability
    box_lps: tuple[float, float, float, float, float, float]  # the ellipsoid's bounding box, mm
    extent_mm: tuple[float | None, float | None, float | None]  # NUM L-R, A-P, H-F axes
    tracking_uid: str = ""
    algorithm_name: str = ""


@dataclass(frozen=True)
class ReportedClassification:
    name: str
    probability: float
    algorithm_name: str = ""


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
    boxes: tuple[ReportedBox, ...] = ()  # a detection bundle's boxes

    def total_volume_ml(self, name: str | None = None) -> float:
        """Sum of the reported lesion volumes (of the label called ``name``, when given)."""
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


def _method(item: Dataset) -> tuple[str, str] | None:
    for child in item.get("ContentSequence", []):
        if _concept(child) == _METHOD and child.get("ConceptCodeSequence"):
            code = child.ConceptCodeSequence[0]
            return (str(code.CodeValue), str(code.CodingSchemeDesignator))
    return None


def _text(items: list[Dataset], concept: tuple[str, str]) -> str:
    return next((str(i.TextValue) for i in items if _concept(i) == concept), "")


def _point(items: list[Dataset]) -> tuple[float, float, float] | None:
    for item in items:
        if item.get("ValueType") == "SCOORD3D" and item.get("GraphicType") == "POINT":
            x, y, z = (float(v) for v in item.GraphicData[:3])
            return (x, y, z)
    return None


def _finding(items: list[Dataset]) -> ReportedFinding | None:
    volumes = [(_method(i), _number(i)) for i in items if _concept(i) == _key(codes.VOLUME)]
    voxel = [v for m, v in volumes if m in (None, _key(codes.VOLUME_METHOD)) and v is not None]
    if not voxel:
        return None
    by_probability = [v for m, v in volumes if m == _key(codes.VOLUME_METHOD_PROBABILITY_SUM)]
    diameters = [_number(i) for i in items if _concept(i) == _key(codes.DIAMETER)]
    return ReportedFinding(
        identifier=_text(items, _TRACKING_IDENTIFIER),
        volume_ml=voxel[0],
        diameter_mm=diameters[0] if diameters else None,
        probability_volume_ml=by_probability[0] if by_probability else None,
        centroid_lps=_point(items),
        tracking_uid=next((str(i.UID) for i in items if _concept(i) == _TRACKING_UID), ""),
        algorithm_name=_text(items, _ALGORITHM_NAME),
    )


def _box(items: list[Dataset]) -> ReportedBox | None:
    ellipsoid = next(
        (i for i in items if i.get("ValueType") == "SCOORD3D" and i.get("GraphicType") == "ELLIPSOID"), None
    )
    if ellipsoid is None:
        return None
    points = [float(v) for v in ellipsoid.GraphicData]
    xs, ys, zs = points[0::3], points[1::3], points[2::3]
    scores = [_number(i) for i in items if _concept(i) == _key(codes.PROBABILITY)]
    extents = tuple(
        next((_number(i) for i in items if _concept(i) == _key(axis)), None) for axis in codes.BOX_AXES
    )
    return ReportedBox(
        identifier=_text(items, _TRACKING_IDENTIFIER),
        score=scores[0] if scores else None,
        box_lps=(min(xs), min(ys), min(zs), max(xs), max(ys), max(zs)),
        extent_mm=(extents[0], extents[1], extents[2]),
        tracking_uid=next((str(i.UID) for i in items if _concept(i) == _TRACKING_UID), ""),
        algorithm_name=_text(items, _ALGORITHM_NAME),
    )


def read_sr(ds: Dataset) -> SrReport:
    """The lesions, classifications, priority and evidence of a TID 1500 SR."""
    findings: list[ReportedFinding] = []
    classes: list[ReportedClassification] = []
    boxes: list[ReportedBox] = []
    priority: Priority | None = None
    by_code = {_key(code): p for p, code in codes.PRIORITY_VALUES.items()}
    for group in (i for i in _walk(ds) if _concept(i) == _MEASUREMENT_GROUP):
        items = list(group.get("ContentSequence", []))
        box = _box(items)
        if box is not None:  # its Probability is the box's score, not a classification
            boxes.append(box)
            continue
        finding = _finding(items)
        if finding is not None:
            findings.append(finding)
        probabilities = [_number(i) for i in items if _concept(i) == _key(codes.PROBABILITY)]
        if probabilities and probabilities[0] is not None:
            name = _text(items, _TRACKING_IDENTIFIER).removesuffix(" (classification)")
            classes.append(ReportedClassification(name, probabilities[0], _text(items, _ALGORITHM_NAME)))
    for item in _walk(ds):  # a document-level qualitative evaluation (or, in older reports, in a group)
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
        boxes=tuple(boxes),
    )
