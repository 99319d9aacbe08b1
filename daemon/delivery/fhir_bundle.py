"""The FHIR R4 transaction Bundle about one result (pure: no network, no clock, no randomness).

Entries, each a conditional update (``PUT Type?identifier=system|value``) so that a re-send
updates what the first send created instead of adding a copy:

* ``DiagnosticReport``: status ``preliminary`` (an AI triage result, not the radiologist's
  report), category RAD (v2-0074), code LOINC 18748-4 "Diagnostic imaging study", the patient by
  identifier, the ImagingStudy by its Study Instance UID (``urn:dicom:uid``), the order by
  accession number, ``conclusion`` (the summary and the disclaimer), ``result`` -> the Observations;
* one ``Observation`` per measurement of each finding (SNOMED CT / DICOM code, UCUM
  ``valueQuantity``), status ``preliminary``;
* a ``Task`` asking to read the study at the triage priority (``routine`` / ``urgent`` / ``stat``;
  FHIR's ``asap`` is not used: the triage scale has three steps), focus the order, for the patient.

Identifiers and ``fullUrl`` UUIDs derive from the SR's SOP Instance UID (so from the job's input
fingerprint): the same result always gives the same Bundle. The resources are R4 (4.0.1); they are
validated with ``fhir.resources``' R4B models, the same shape for these resources.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote

from daemon.delivery.report import DISCLAIMER, ResultReport, is_oid, stable_id, stable_uuid
from vocabulary import Priority

DICOM_UID = "urn:dicom:uid"
OUR_SYSTEM = "urn:pacs-triage"  # identifiers of the resources we create (+ ":report", ":observation"...)
UCUM = "http://unitsofmeasure.org"
SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM"}
FHIR_PRIORITY: dict[Priority, str] = {
    Priority.ROUTINE: "routine",
    Priority.URGENT: "urgent",
    Priority.STAT: "stat",
}
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _when(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _identifier(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


def _entry(report: ResultReport, resource: dict[str, Any], identifier: dict[str, str]) -> dict[str, Any]:
    kind = resource["resourceType"]
    key = f"{kind}|{identifier['value']}"
    return {
        "fullUrl": f"urn:uuid:{stable_uuid(report, key)}",
        "resource": resource,
        "request": {
            "method": "PUT",
            "url": f"{kind}?identifier={identifier['system']}|{identifier['value']}",
        },
    }


def _patient(r: ResultReport) -> dict[str, Any] | None:
    """The patient, by identifier (the study's Patient ID and its issuer); None without a Patient ID."""
    if not r.patient_id:
        return None
    identifier = {"value": r.patient_id}
    if r.issuer_of_patient_id:  # an OID as urn:oid:, any other issuer under our own namespace
        issuer = r.issuer_of_patient_id
        identifier["system"] = (
            f"urn:oid:{issuer}" if is_oid(issuer) else f"urn:pacs-triage:issuer:{quote(issuer)}"
        )
    family, _, rest = r.patient_name.split("=")[0].partition("^")
    given = " ".join(p for p in rest.split("^")[:2] if p)
    display = " ".join(p for p in (given, family) if p)
    return {"identifier": identifier, **({"display": display} if display else {})}


def transaction(report: ResultReport) -> dict[str, Any]:
    """The transaction Bundle of ``report`` as JSON-ready data."""
    r = report
    patient = _patient(r)
    study = {
        "identifier": _identifier(DICOM_UID, f"urn:oid:{r.study_instance_uid}"),
        "type": "ImagingStudy",
    }
    order: dict[str, Any] = {
        "type": "ServiceRequest",
        "identifier": {
            "type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]},
            "value": r.order_number,
        },
    }
    entries: list[dict[str, Any]] = []
    references = []
    for index, m in enumerate(r.measurements, start=1):
        ident = _identifier(f"{OUR_SYSTEM}:observation", f"{r.sr_sop_instance_uid}.{index}")
        observation = {
            "resourceType": "Observation",
            "identifier": [ident],
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                        }
                    ]
                }
            ],
            "code": {
                "coding": [{"system": SYSTEMS[m.scheme], "code": m.code, "display": m.meaning}],
                "text": f"{m.finding} {m.meaning.lower()}",
            },
            **({"subject": patient} if patient else {}),
            "effectiveDateTime": _when(r.study_datetime or r.analysed_at),
            "issued": _when(r.analysed_at),
            "valueQuantity": {"value": round(m.value, 3), "unit": m.unit, "system": UCUM, "code": m.unit},
            "partOf": [study],
        }
        entry = _entry(r, observation, ident)
        entries.append(entry)
        references.append({"reference": entry["fullUrl"]})
    report_id = _identifier(f"{OUR_SYSTEM}:report", r.sr_sop_instance_uid)
    summary = r.summary.strip().rstrip(".")
    conclusion = " ".join(
        x
        for x in (
            f"{summary}." if summary else "",
            f"Triage priority: {FHIR_PRIORITY[r.priority]}.",
            DISCLAIMER,
        )
        if x
    )
    diagnostic: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [report_id, _identifier(DICOM_UID, f"urn:oid:{r.sr_sop_instance_uid}")],
        "basedOn": [order],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
            ]
        },
        **({"subject": patient} if patient else {}),
        "effectiveDateTime": _when(r.study_datetime or r.analysed_at),
        "issued": _when(r.analysed_at),
        "imagingStudy": [study],
        "result": references,
        "conclusion": conclusion,
    }
    if not references:
        del diagnostic["result"]
    report_entry = _entry(r, diagnostic, report_id)
    task_id = _identifier(f"{OUR_SYSTEM}:task", r.sr_sop_instance_uid)
    task = {
        "resourceType": "Task",
        "identifier": [task_id],
        "basedOn": [order],
        "status": "requested",
        "intent": "order",
        "priority": FHIR_PRIORITY[r.priority],
        "code": {"text": "Read the imaging study at the triage priority"},
        "description": f"AI triage: read study {r.study_instance_uid} as {FHIR_PRIORITY[r.priority]}",
        "focus": order,
        **({"for": patient} if patient else {}),
        "authoredOn": _when(r.analysed_at),
        "reasonReference": {"reference": report_entry["fullUrl"]},
    }
    return {
        "resourceType": "Bundle",
        "identifier": _identifier(f"{OUR_SYSTEM}:bundle", stable_id(r, "fhir", 32)),
        "type": "transaction",
        "entry": [report_entry, *entries, _entry(r, task, task_id)],
    }


def validate(bundle: dict[str, Any]) -> None:
    """Validate every resource with fhir.resources (R4B models); ValueError says which and why."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        raise ValueError(f"the FHIR Bundle is not valid R4: {exc}") from exc
