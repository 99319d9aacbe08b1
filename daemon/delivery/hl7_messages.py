"""HL7 v2.5 messages about one result, as strings (pure: no network, no clock, no randomness).

* :func:`oru_r01`: the result. MSH, PID (the study's patient identifiers), OBR (order number:
  the accession number, else the Study Instance UID; LOINC 18748-4 "Diagnostic imaging study";
  OBR-25 ``P``, or ``C`` "correction" when the SR supersedes an earlier one of the same study),
  an NTE with the disclaimer, TQ1 with the priority (TQ1-9), then OBX: the Study Instance UID
  (DCM 113014), the priority (``pipeline.codes.PRIORITY``, coded), one OBX per measurement of each finding (coded
  concept, value, UCUM unit; OBX-4 groups a finding's values) and the summary text.
* :func:`order_update`: the priority for a RIS or reading worklist to reorder by: ``ORM^O01``
  (ORC-1 ``XO``, ORC-7 quantity/timing with the priority in its 6th component) or ``OMI^O23``
  (ORC, TQ1-9, OBR, IPC with accession and Study Instance UID).

Priorities map to HL7 table 0485 (and 0027): routine ``R``, urgent ``A`` (as soon as possible),
stat ``S``. Results are preliminary (OBR-25 / OBX-11 ``P``): an AI triage result never replaces a
radiologist's report.

Every message's control ID (MSH-10) and time (MSH-7, the analysis time) are fixed by the result,
so a re-send is byte-identical and a receiver that keeps control IDs recognises the duplicate.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydicom.sr.coding import Code

from daemon.delivery.report import DISCLAIMER, ResultReport, is_oid
from pipeline import codes
from vocabulary import Priority

VERSION = "2.5"
SEGMENT_SEPARATOR = "\r"
PROCEDURE = ("18748-4", "Diagnostic imaging study", "LN")
PRIORITY_CODES: dict[Priority, str] = {Priority.ROUTINE: "R", Priority.URGENT: "A", Priority.STAT: "S"}


@dataclass(frozen=True, kw_only=True)
class Header:
    """MSH values that come from the configuration."""

    sending_application: str = "PACS_TRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"


def _ce(code: Code) -> str:
    """A coded concept as CE/CWE: identifier^text^coding system (the DICOM scheme designators)."""
    return f"{escape(code.value)}^{escape(code.meaning)}^{escape(code.scheme_designator)}"


def escape(text: str) -> str:
    """Text as an HL7 field value: delimiters escaped (v2.5 ch. 2 §2.7.4), line breaks as ``\\.br\\``."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("&", "\\T\\").replace("~", "\\R\\")
    return out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def ts(value: dt.datetime | None) -> str:
    """An HL7 TS (YYYYMMDDHHMMSS+ZZZZ); empty for None."""
    return "" if value is None else value.strftime("%Y%m%d%H%M%S%z")


def number(value: float) -> str:
    """An NM value without false precision (3 significant decimals at most)."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _segment(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def _msh(header: Header, message_type: str, control_id: str, at: dt.datetime) -> str:
    return "MSH|^~\\&|" + _segment(
        escape(header.sending_application),
        escape(header.sending_facility),
        escape(header.receiving_application),
        escape(header.receiving_facility),
        ts(at),
        "",
        message_type,
        control_id,
        header.processing_id,
        VERSION,
        "",
        "",
        "",
        "",
        "",
        "UNICODE UTF-8",
    )


def _pid(r: ResultReport) -> list[str]:
    """The PID segment; none without a Patient ID (PID-3 is required, the patient group optional)."""
    if not r.patient_id:
        return []
    ident = escape(r.patient_id)
    if r.issuer_of_patient_id:  # CX-4 assigning authority (HD): an OID as universal ID of type ISO
        issuer = escape(r.issuer_of_patient_id)
        ident += f"^^^&{issuer}&ISO" if is_oid(r.issuer_of_patient_id) else f"^^^{issuer}"
    alphabetic = r.patient_name.split("=")[0]  # PN: the alphabetic group (ideographic, phonetic follow)
    name = "^".join(escape(p) for p in alphabetic.split("^")).rstrip("^")
    sex = r.sex if r.sex in ("M", "F", "O") else ("U" if r.sex else "")
    return [_segment("PID", "1", "", ident, "", name, "", r.birth_date, sex)]


def _order_number(r: ResultReport, namespace: str) -> str:
    return f"{escape(r.order_number)}^{escape(namespace)}"


def _obr(r: ResultReport, header: Header, *, status: str, priority_tq: bool) -> str:
    code, meaning, scheme = PROCEDURE
    fields = [""] * 28
    fields[0] = "OBR"
    fields[1] = "1"
    fields[3] = _order_number(r, header.sending_application)
    fields[4] = f"{code}^{meaning}^{scheme}"
    fields[7] = ts(r.study_datetime)
    fields[18] = escape(r.accession_number)
    fields[22] = ts(r.analysed_at)
    fields[24] = "RAD"
    fields[25] = status
    if priority_tq:
        fields[27] = f"^^^^^{PRIORITY_CODES[r.priority]}"
    return _segment(*fields)


def _tq1(r: ResultReport) -> str:
    return _segment("TQ1", "1", "", "", "", "", "", "", "", PRIORITY_CODES[r.priority])


def _obx(
    index: int, value_type: str, identifier: str, sub_id: str, value: str, unit: str, at: dt.datetime
) -> str:
    return _segment(
        "OBX", str(index), value_type, identifier, sub_id, value, unit, "", "", "", "", "P", "", "", ts(at)
    )


def oru_r01(report: ResultReport, header: Header, control_id: str) -> str:
    """The ORU^R01 result message of ``report`` (segments separated by CR, no MLLP framing)."""
    r = report
    value = codes.PRIORITY_VALUES[r.priority]
    observations = [
        ("ST", "113014^DICOM Study^DCM", "", escape(r.study_instance_uid), ""),
        ("CWE", _ce(codes.PRIORITY), "", _ce(value), ""),
    ]
    named: set[int] = set()
    for m in r.measurements:
        if m.group not in named:  # each finding: its name (tracking identifier), then its values
            named.add(m.group)
            observations.append(("ST", "112039^Tracking Identifier^DCM", str(m.group), escape(m.finding), ""))
        observations.append(
            (
                "NM",
                f"{m.code}^{escape(m.meaning)}^{m.scheme}",
                str(m.group),
                number(m.value),
                f"{m.unit}^{m.unit_meaning}^UCUM",
            )
        )
    if r.summary:
        observations.append(("TX", "121111^Summary^DCM", "", escape(r.summary), ""))
    segments = [
        _msh(header, "ORU^R01^ORU_R01", control_id, r.analysed_at),
        *_pid(r),
        _obr(r, header, status="C" if r.supersedes else "P", priority_tq=False),
        _segment("NTE", "1", "L", escape(DISCLAIMER)),
        *(
            [_segment("NTE", "2", "L", "Replaces the earlier result of this order: more images arrived.")]
            if r.supersedes
            else []
        ),
        _tq1(r),
        *(_obx(i, *o, r.analysed_at) for i, o in enumerate(observations, start=1)),
    ]
    return SEGMENT_SEPARATOR.join(segments)


def order_update(report: ResultReport, header: Header, control_id: str, message_type: str) -> str:
    """The order update carrying the priority: ``ORM^O01`` (ORC-7) or ``OMI^O23`` (TQ1-9, IPC)."""
    r = report
    priority = PRIORITY_CODES[r.priority]
    orc = [""] * 10
    orc[0], orc[1] = "ORC", "XO"  # change order request
    orc[3] = _order_number(r, header.sending_application)
    orc[5] = "IP"  # in process: images received, result pending a radiologist
    orc[9] = ts(r.analysed_at)
    if message_type == "ORM^O01":
        orc = [*orc[:7], f"^^^^^{priority}", *orc[8:]]
        segments = [
            _msh(header, "ORM^O01^ORM_O01", control_id, r.analysed_at),
            *_pid(r),
            _segment(*orc),
            _obr(r, header, status="", priority_tq=True),
        ]
    elif message_type == "OMI^O23":
        ipc = _segment(
            "IPC",
            f"{escape(r.order_number)}^{escape(header.sending_application)}",
            escape(r.order_number),
            escape(r.study_instance_uid),
            escape(r.order_number),
        )
        segments = [
            _msh(header, "OMI^O23^OMI_O23", control_id, r.analysed_at),
            *_pid(r),
            _segment(*orc),
            _tq1(r),
            _obr(r, header, status="", priority_tq=False),
            ipc,
        ]
    else:
        raise ValueError(f"order update {message_type!r}: choose ORM^O01 or OMI^O23")
    return SEGMENT_SEPARATOR.join(segments)
