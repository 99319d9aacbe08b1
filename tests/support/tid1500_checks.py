"""The project's TID 1500 assertions: template content that dciodvfy and dsrdump do not check.

Works on plain pydicom datasets (any writer's SR), walking the content tree itself:

- ``check_tid1500_generic``: what every TID 1500 Measurement Report has (PS3.16 TID 1500, 1501,
  1410/1411, 4108). It passes on the real examples in ``testdata/sr_examples`` (dcmqi, highdicom).
- ``check_pacs_triage_sr``: what our reports add: device observer, one group per lesion with its
  voxel-count volume in UCUM ml (method 126030; the generic part only asks for UCUM units), TID 4019
  identification of the model that produced each group, carrying its bundle sha256, the triage
  priority at the document level, every model a Contributing Equipment item (IHE AIR), references
  only to the source images (and our SEG), same study, new series.
- ``check_deterministic``: the same inputs give the same SOP Instance and Series UIDs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pipeline.findings import Findings

Concept = tuple[str, str]  # (CodeValue, CodingSchemeDesignator)

IMAGING_MEASUREMENT_REPORT: Concept = ("126000", "DCM")
PROCEDURE_REPORTED: Concept = ("121058", "DCM")
OBSERVER_TYPE: Concept = ("121005", "DCM")
DEVICE: Concept = ("121007", "DCM")
DEVICE_OBSERVER_UID: Concept = ("121012", "DCM")
IMAGING_MEASUREMENTS: Concept = ("126010", "DCM")
MEASUREMENT_GROUP: Concept = ("125007", "DCM")
TRACKING_IDENTIFIER: Concept = ("112039", "DCM")
TRACKING_UID: Concept = ("112040", "DCM")
VOLUME_CONCEPTS: frozenset[Concept] = frozenset({("118565006", "SCT"), ("G-D705", "SRT")})  # SRT: legacy
ALGORITHM_NAME: Concept = ("111001", "DCM")
ALGORITHM_VERSION: Concept = ("111003", "DCM")
ALGORITHM_PARAMETERS: Concept = ("111002", "DCM")
PRIORITY: Concept = ("260870009", "SCT")
QUALITATIVE_EVALUATIONS: Concept = ("C0034375", "UMLS")  # TID 1500 document-level container
VOXEL_VOLUME_METHOD: Concept = ("126030", "DCM")
MEASUREMENT_METHOD: Concept = ("370129005", "SCT")
PROCESSING_ALGORITHM: Concept = ("Newcode1", "99IHE")  # IHE AIR Contributing Equipment purpose


def concept(item: Dataset) -> Concept | None:
    """The (value, scheme) of an item's concept name, if it has one."""
    if "ConceptNameCodeSequence" not in item or not item.ConceptNameCodeSequence:
        return None
    code = item.ConceptNameCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def walk(item: Dataset) -> Iterator[Dataset]:
    """Every content item below ``item`` (depth first, not ``item`` itself)."""
    for child in children(item):
        yield child
        yield from walk(child)


def _one(items: Sequence[Dataset], wanted: Concept, where: str) -> Dataset:
    found = [item for item in items if concept(item) == wanted]
    assert len(found) == 1, f"{where}: expected one {wanted}, found {len(found)}"
    return found[0]


def evidence_uids(ds: Dataset) -> set[str]:
    """SOP Instance UIDs in the Current Requested Procedure and Pertinent Other evidence (PS3.3 C.17.2)."""
    uids: set[str] = set()
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                uids.update(
                    str(ref.ReferencedSOPInstanceUID) for ref in series.get("ReferencedSOPSequence", [])
                )
    return uids


def referenced_uids(ds: Dataset) -> set[str]:
    """SOP Instance UIDs referenced by IMAGE / COMPOSITE content items anywhere in the tree."""
    uids: set[str] = set()
    for item in walk(ds):
        for ref in item.get("ReferencedSOPSequence", []):
            uids.add(str(ref.ReferencedSOPInstanceUID))
    return uids


@dataclass(frozen=True)
class Group:
    """A measurement group as the checks see it."""

    item: Dataset
    tracking_identifier: str
    tracking_uid: str

    def items(self, wanted: Concept) -> list[Dataset]:
        return [child for child in children(self.item) if concept(child) == wanted]


def check_tid1500_generic(ds: Dataset) -> list[Group]:
    """Assert the generic TID 1500 structure; return the measurement groups."""
    assert ds.get("ValueType") == "CONTAINER", "root content item must be a CONTAINER"
    assert concept(ds) == IMAGING_MEASUREMENT_REPORT, f"document title is {concept(ds)}, not (126000, DCM)"
    for template in ds.get("ContentTemplateSequence", []):
        assert template.TemplateIdentifier == "1500", f"root template is TID {template.TemplateIdentifier}"
    root = children(ds)
    procedures = [item for item in root if concept(item) == PROCEDURE_REPORTED]
    assert procedures, "no 'Procedure reported' (121058, DCM) at the root"
    assert all(item.ValueType == "CODE" for item in procedures)
    observer_types = [item for item in root if concept(item) == OBSERVER_TYPE]
    assert observer_types, "no observer context (TID 1002 'Observer Type') at the root"

    containers = [item for item in root if concept(item) == IMAGING_MEASUREMENTS]
    assert len(containers) <= 1, f"root: {len(containers)} 'Imaging Measurements' containers"
    group_items = [
        item
        for measurements in containers
        for item in children(measurements)
        if concept(item) == MEASUREMENT_GROUP
    ]
    groups: list[Group] = []
    for number, item in enumerate(group_items, start=1):
        where = f"measurement group {number}"
        identifier = _one(children(item), TRACKING_IDENTIFIER, where)
        uid = _one(children(item), TRACKING_UID, where)
        assert identifier.ValueType == "TEXT" and str(identifier.TextValue), (
            f"{where}: empty Tracking Identifier"
        )
        assert uid.ValueType == "UIDREF" and UID(uid.UID).is_valid, (
            f"{where}: bad Tracking UID {uid.get('UID')}"
        )
        groups.append(Group(item, str(identifier.TextValue), str(uid.UID)))

    for item in walk(ds):
        if item.get("ValueType") == "NUM" and item.get("MeasuredValueSequence"):
            unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            assert unit.CodingSchemeDesignator == "UCUM", f"unit {unit.CodeValue} is not UCUM (CID 7181)"
    missing = referenced_uids(ds) - evidence_uids(ds)
    assert not missing, f"content references instances missing from the evidence sequences: {sorted(missing)}"
    return groups


def _text_values(group: Group, wanted: Concept) -> list[str]:
    return [str(item.TextValue) for item in group.items(wanted)]


def check_pacs_triage_sr(
    ds: Dataset, *, sources: Sequence[Dataset], findings: Findings, seg: Dataset | None = None
) -> list[Group]:
    """Assert what a pacs-triage report must hold beyond the generic TID 1500 structure."""
    groups = check_tid1500_generic(ds)
    root = children(ds)

    observer_types = [item for item in root if concept(item) == OBSERVER_TYPE]
    observers = [
        (str(item.ConceptCodeSequence[0].CodeValue), str(item.ConceptCodeSequence[0].CodingSchemeDesignator))
        for item in observer_types
    ]
    assert DEVICE in observers, f"no device observer (TID 1004) among observer types {observers}"
    _one(root, DEVICE_OBSERVER_UID, "root")

    source_uids = {str(s.SOPInstanceUID) for s in sources}
    allowed = source_uids | ({str(seg.SOPInstanceUID)} if seg is not None else set())
    referenced = referenced_uids(ds)
    assert source_uids <= referenced, "not every source image is referenced (Image Library)"
    assert referenced <= allowed, f"references outside the sources: {sorted(referenced - allowed)}"
    assert evidence_uids(ds) == allowed, "evidence must list exactly the source images (and the SEG)"

    first = sources[0]
    assert ds.StudyInstanceUID == first.StudyInstanceUID, "the SR must be in the source study"
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID, "the SR must be in a new series"
    assert ds.PatientID == first.get("PatientID", ""), "PatientID not copied from the source"

    by_class = {f"{c.name} (classification)": findings.algorithm_of(c) for c in findings.classifications}
    for group in groups:
        where = f"group {group.tracking_identifier!r}"
        algorithm = by_class.get(group.tracking_identifier, findings.algorithm)  # each names its own model
        assert _text_values(group, ALGORITHM_NAME) == [algorithm.name], f"{where}: algorithm name"
        assert _text_values(group, ALGORITHM_VERSION) == [algorithm.version], f"{where}: algorithm version"
        assert any(algorithm.sha256 in p for p in _text_values(group, ALGORITHM_PARAMETERS)), (
            f"{where}: no algorithm parameter carries the bundle sha256"
        )
    by_name = {group.tracking_identifier: group for group in groups}
    for finding in findings.findings:
        key = finding.tracking_identifier
        assert key in by_name, f"no measurement group for lesion {key!r}"
        group = by_name[key]
        volumes = [  # the volume of the voxels the SEG shows; a probability-sum volume may follow
            item
            for item in children(group.item)
            if concept(item) in VOLUME_CONCEPTS
            and [code_value(m) for m in children(item) if concept(m) == MEASUREMENT_METHOD]
            == [VOXEL_VOLUME_METHOD]
        ]
        assert len(volumes) == 1, f"lesion {key!r}: expected one voxel-count Volume, found {len(volumes)}"
        measured = volumes[0].MeasuredValueSequence[0]
        unit = measured.MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("ml", "UCUM"), (
            f"finding {finding.name!r}: volume in {unit.CodeValue} ({unit.CodingSchemeDesignator}), not UCUM ml"
        )
        value = float(measured.NumericValue)
        assert abs(value - finding.volume_ml) <= 5e-3 * max(1e-3, finding.volume_ml), (  # 3 digits
            f"lesion {key!r}: volume {value} ml, expected {finding.volume_ml}"
        )
        image_refs = [item for item in walk(group.item) if item.get("ValueType") == "IMAGE"]
        if finding.volume_ml > 0:
            assert image_refs, f"finding {finding.name!r}: no reference to a source image or segment"
    priorities = [item for item in walk(ds) if concept(item) == PRIORITY]
    assert len(priorities) == 1, f"expected one triage Priority, found {len(priorities)}"
    evaluations = _one(root, QUALITATIVE_EVALUATIONS, "root")  # at the document level, not in a group
    assert [concept(item) for item in children(evaluations)] == [PRIORITY], "priority is not document level"
    models = {
        str(item.ManufacturerModelName)
        for item in ds.get("ContributingEquipmentSequence", [])
        if item.get("PurposeOfReferenceCodeSequence")
        and code_value(item.PurposeOfReferenceCodeSequence[0]) == PROCESSING_ALGORITHM
        and item.get("DeviceUID")
    }
    assert {a.name for a in findings.algorithms} <= models, (
        f"models {models}: not every model is named (IHE AIR)"
    )
    return groups


def code_value(code: Dataset) -> Concept:
    """(CodeValue, CodingSchemeDesignator) of a code item or of a CODE content item's value."""
    if "ConceptCodeSequence" in code:
        code = code.ConceptCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def check_deterministic(make: Callable[[], Dataset]) -> Dataset:
    """Build twice: same SOP Instance UID and Series Instance UID. Returns the first build."""
    first, second = make(), make()
    assert first.SOPInstanceUID == second.SOPInstanceUID, "SOP Instance UID differs between identical runs"
    assert first.SeriesInstanceUID == second.SeriesInstanceUID, (
        "Series Instance UID differs between identical runs"
    )
    return first
