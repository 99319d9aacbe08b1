"""Every coded concept the SR and SEG writers emit, in one table (STYLE.md section 4).

Sources: DCM and LN/SCT codes that DICOM uses are from PS3.16 (the context group is cited on each
line; pydicom's ``pydicom.sr.codedict``, generated from PS3.16, carries the same values and a test
checks them). The SNOMED CT triage priorities are the descendants of 272125009 |Priorities|; DICOM
has no context group for a reading priority. Units are UCUM (PS3.16 CID 7181).

Codes that no standard terminology provides (a finding without a coded category or type) use our
local scheme ``99PTRIAGE`` (PS3.16 section 8.2: designators beginning with "99" are private); every
object that uses it identifies it in its Coding Scheme Identification Sequence (PS3.3 C.12.1).
"""

from __future__ import annotations

import hashlib

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

from pipeline import findings
from pipeline.labels import segment_codes

# --- TID 1500 document ----------------------------------------------------------------------------
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")  # CID 7021
# CID 100 "Quantitative Diagnostic Imaging Procedures", by the series' Modality.
PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "PT": Code("44136-0", "LN", "PET unspecified body region"),
}
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")  # CID 100, any other modality
OBSERVER_TYPE_DEVICE = Code("121007", "DCM", "Device")  # CID 270
SUMMARY = Code("121111", "DCM", "Summary")  # PS3.16 Annex D; root TEXT item for text-only viewers

# --- measurements (TID 1411 / TID 1419 / TID 300) ---------------------------------------------------
VOLUME = Code("118565006", "SCT", "Volume")  # CID 7469
# CID 7474 "Volume Measurement Methods": the voxels of the segment x voxel volume (what the SEG shows).
VOLUME_METHOD = Code("126030", "DCM", "Sum of segmented voxel method for volume")
DIAMETER = Code("81827009", "SCT", "Diameter")  # CID 7469
MAXIMUM = Code("56851009", "SCT", "Maximum")  # CID 7464, derivation: the largest diameter
CENTER_OF_MASS = Code("128138", "DCM", "Center of Mass")  # CID 219, geometric purpose of a POINT
PROBABILITY = Code("122157", "DCM", "Probability")  # PS3.16 Annex D
# TID 1501 "Finding" (121071, DCM): the subject a group's probability is about.
FINDING = Code("121071", "DCM", "Finding")
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_NONE = Code("1", "UCUM", "no units")  # a probability is dimensionless
# A detection box's extent along the patient's L, P and S axes (pipeline.writers.sr_boxes); PS3.16 Annex D.
BOX_AXES = (
    Code("110860", "DCM", "Left-Right Axis"),
    Code("110862", "DCM", "Anterior-Posterior Axis"),
    Code("110861", "DCM", "Head-Foot Axis"),
)

# --- triage priority: a document-level qualitative evaluation (TID 1500 "Qualitative Evaluations") ---
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 container
PRIORITY = Code("260870009", "SCT", "Priority")
PRIORITY_VALUES: dict[findings.Priority, Code] = {
    findings.Priority.ROUTINE: Code("50811001", "SCT", "Routine"),
    findings.Priority.URGENT: Code("103391001", "SCT", "Urgent"),
    findings.Priority.STAT: Code("49499008", "SCT", "Stat"),
}

# --- algorithm identification ---------------------------------------------------------------------
# SEG Segment Description (PS3.3 C.8.20.2) needs a family; TID 4019 in the SR carries none (highdicom
# would read an Algorithm Family CODE item in a group back as a qualitative evaluation).
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162
# IHE Radiology AI Results (AIR): Contributing Equipment Sequence item of the model that produced a
# result (Purpose of Reference). IHE's interim code; no DICOM code exists yet.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

# --- local codes -----------------------------------------------------------------------------------
PRIVATE_SCHEME = "99PTRIAGE"
UNCODED_CATEGORY = Code("UNCODED", PRIVATE_SCHEME, "Finding without a coded category")
# A second volume of a lesion: the sum of its probabilities (sub-voxel); no standard method code exists.
VOLUME_METHOD_PROBABILITY_SUM = Code(
    "PROBSUM", PRIVATE_SCHEME, "Sum of voxel probabilities method for volume"
)

_CODE_VALUE_MAX = 16  # CodeValue is SH (PS3.5 6.2)
_CODE_MEANING_MAX = 64  # CodeMeaning is LO


def coded(code: findings.Code | Code) -> CodedConcept:
    """A ``pipeline.findings.Code`` (or pydicom ``Code``) as a highdicom ``CodedConcept``."""
    if isinstance(code, findings.Code):
        return CodedConcept(code.value, code.scheme, code.meaning)
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def finding_type(finding: findings.Finding) -> CodedConcept:
    """The finding's coded type, or a local code naming its label when the label map has none."""
    if finding.type is not None:
        return coded(finding.type)
    value = f"LABEL-{finding.label}"[:_CODE_VALUE_MAX]
    return CodedConcept(value, PRIVATE_SCHEME, finding.name[:_CODE_MEANING_MAX] or value)


def classification_subject(name: str) -> CodedConcept:
    """What a class's probability is about: its label-map code ("lesion present" is a Lesion), else local."""
    words = name.strip().split()
    base = " ".join(words[:-1]) if len(words) > 1 and words[-1].lower() in ("present", "presence") else name
    known = segment_codes(base)
    if known is not None:
        return coded(known.type)
    value = "CLASS-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[: _CODE_VALUE_MAX - 6]
    return CodedConcept(value, PRIVATE_SCHEME, name[:_CODE_MEANING_MAX] or value)


def finding_category(finding: findings.Finding) -> CodedConcept:
    """The finding's coded category, or the local "uncoded" category."""
    return coded(finding.category) if finding.category is not None else coded(UNCODED_CATEGORY)


def private_scheme_identification() -> CodingSchemeIdentificationItem:
    """A fresh Coding Scheme Identification item (PS3.3 C.12.1) declaring ``99PTRIAGE``."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="pacs-triage local codes",
        responsible_organization="pacs-triage project",
    )


def uses_private_scheme(items: list[CodedConcept]) -> bool:
    """True when any of ``items`` is in our local scheme (its identification must then be written)."""
    return any(item.scheme_designator == PRIVATE_SCHEME for item in items)


def procedure_reported(modality: str) -> Code:
    """TID 1500 "Procedure reported" for a series of this Modality (CID 100)."""
    return PROCEDURE_BY_MODALITY.get(modality.upper(), IMAGING_PROCEDURE)
