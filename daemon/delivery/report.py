"""What a message about one result says, read from the result's SR: patient, study, findings, priority.

HL7 and FHIR destinations send a *report* of a job's SR rather than the object itself. The SR
holds everything they need (the study's patient and order identifiers, the findings, the
priority, when the analysis ran), so a message can be built at send time from the stored result
alone, the same bytes on every attempt. ``stable_id`` derives the identifiers that make a re-send
recognisable (HL7 MSH-10, FHIR Bundle and entry identifiers) from the SR's SOP Instance UID, which
itself derives from the job's input fingerprint: the same input always gives the same IDs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code as PydicomCode

from daemon.delivery.base import Permanent
from pipeline import codes
from pipeline.writers.sr_reader import read_sr
from vocabulary import Priority

DISCLAIMER = (
    "Automated triage result from pacs-triage (AI software). Not a diagnosis and not a radiology "
    "report: it orders the reading worklist only. NOT FOR DIAGNOSTIC USE."
)
# A fixed namespace so that the same SR gives the same UUIDs on every node and every release.
UUID_NAMESPACE = uuid.UUID("5b0d9a52-7f1e-5c8e-9a43-0f3f6c1d2b7e")


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One number of a finding: ``what`` is (code, meaning) in ``scheme``; ``unit`` is UCUM."""

    finding: str  # the finding's name (tracking identifier), e.g. "lesion 1"
    group: int  # 1-based: the finding it belongs to (HL7 OBX-4 sub-ID)
    code: str
    scheme: str  # "SCT" or "DCM"
    meaning: str
    value: float
    unit: str  # UCUM code
    unit_meaning: str


@dataclass(frozen=True, kw_only=True)
class ResultReport:
    """The values every message about one analysed study carries."""

    sr_sop_instance_uid: str
    study_instance_uid: str
    accession_number: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str  # DICOM PN: Family^Given^Middle^Prefix^Suffix
    birth_date: str  # YYYYMMDD or ""
    sex: str  # M, F, O or ""
    study_datetime: dt.datetime | None
    study_description: str
    analysed_at: dt.datetime  # the SR's Content Date/Time (when the analysis ran)
    priority: Priority
    measurements: tuple[Measurement, ...]
    summary: str
    supersedes: tuple[str, ...] = ()  # SOP Instance UIDs of earlier reports this one replaces

    @property
    def order_number(self) -> str:
        """The order the result belongs to: the accession number, else the Study Instance UID."""
        return self.accession_number or self.study_instance_uid


OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def is_oid(text: str) -> bool:
    """Whether ``text`` is an ISO object identifier (DICOM Issuer of Patient ID is often one)."""
    return bool(OID.match(text)) and len(text) <= 64


def stable_id(report: ResultReport, content: str, length: int = 20) -> str:
    """An identifier for ``content`` of this report, the same on every attempt (upper-case hex)."""
    digest = hashlib.sha256(f"{report.sr_sop_instance_uid}|{content}".encode()).hexdigest()
    return digest[:length].upper()


def stable_uuid(report: ResultReport, what: str) -> uuid.UUID:
    return uuid.uuid5(UUID_NAMESPACE, f"{report.sr_sop_instance_uid}|{what}")


def load_report(path: Path) -> ResultReport:
    """Read the SR at ``path``; :class:`Permanent` when it is not a readable SR."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise Permanent(f"result file {path} is not readable DICOM: {exc}") from exc
    if "ContentSequence" not in ds and "ConceptNameCodeSequence" not in ds:
        raise Permanent(f"result file {path} is not a structured report; HL7 and FHIR are built from the SR")
    return report_of(ds)


def report_of(ds: Dataset) -> ResultReport:
    """The report of an SR dataset (pure: no file, no clock)."""
    sr = read_sr(ds)
    measurements: list[Measurement] = []
    for group, f in enumerate(sr.findings, start=1):  # one lesion per group, by tracking identifier
        measurements.append(_measurement(f.identifier, group, codes.VOLUME, f.volume_ml, "mL", "milliliter"))
        if f.diameter_mm is not None:
            measurements.append(
                _measurement(f.identifier, group, codes.DIAMETER, f.diameter_mm, "mm", "millimeter")
            )
    for group, c in enumerate(sr.classifications, start=len(sr.findings) + 1):
        measurements.append(_measurement(c.name, group, codes.PROBABILITY, c.probability, "1", "no units"))
    first_box = len(sr.findings) + len(sr.classifications) + 1
    for group, b in enumerate(sr.boxes, start=first_box):  # a detection bundle's boxes: score, extent
        if b.score is not None:
            measurements.append(
                _measurement(b.identifier, group, codes.PROBABILITY, b.score, "1", "no units")
            )
        for axis, extent in zip(codes.BOX_AXES, b.extent_mm, strict=True):
            if extent is not None:
                measurements.append(_measurement(b.identifier, group, axis, extent, "mm", "millimeter"))
    return ResultReport(
        sr_sop_instance_uid=sr.sop_instance_uid,
        study_instance_uid=sr.study_instance_uid,
        accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
        sex=_text(ds, "PatientSex"),
        study_datetime=_datetime(_text(ds, "StudyDate"), _text(ds, "StudyTime")),
        study_description=_text(ds, "StudyDescription"),
        analysed_at=_datetime(_text(ds, "ContentDate"), _text(ds, "ContentTime"))
        or _datetime(_text(ds, "InstanceCreationDate"), _text(ds, "InstanceCreationTime"))
        or dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        priority=sr.priority if sr.priority is not None else Priority.ROUTINE,
        measurements=tuple(measurements),
        summary=sr.summary or _text_items(ds),
        supersedes=tuple(
            str(ref.ReferencedSOPInstanceUID)
            for study in ds.get("PredecessorDocumentsSequence", [])
            for series in study.get("ReferencedSeriesSequence", [])
            for ref in series.get("ReferencedSOPSequence", [])
        ),
    )


def _measurement(
    finding: str, group: int, concept: PydicomCode, value: float, unit: str, unit_meaning: str
) -> Measurement:
    return Measurement(
        finding=finding,
        group=group,
        code=str(concept.value),
        scheme=str(concept.scheme_designator),
        meaning=str(concept.meaning),
        value=value,
        unit=unit,
        unit_meaning=unit_meaning,
    )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _text_items(ds: Dataset) -> str:
    """The first TEXT item of the tree (a Basic Text SR such as ``echo``'s has no coded summary)."""
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT" and item.get("TextValue"):
            return str(item.TextValue).strip()
    return ""


def _datetime(date: str, time: str) -> dt.datetime | None:
    """A DICOM DA + TM as an aware datetime (the values carry no zone: read as UTC)."""
    if len(date) != 8 or not date.isdigit():
        return None
    digits = time.split(".")[0].ljust(6, "0")[:6] if time else "000000"
    try:
        return dt.datetime.strptime(date + digits, "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
