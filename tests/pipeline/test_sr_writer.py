"""TID 1500 SR writer: real CT/MR headers in, validated and round-tripped SR out.

Every SR built here goes through dciodvfy, dsrdump, a bytes round trip, highdicom's parser and the
project's TID 1500 checks (``tid1500_checks``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.uid import UID

from pipeline import codes
from pipeline.findings import Finding, Findings
from pipeline.uids import derive_uid, result_uids
from pipeline.volume import Volume
from pipeline.writers.seg import write_seg
from pipeline.writers.sr import write_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import (
    ALGORITHM,
    assert_dciodvfy_clean,
    assert_dsrdump_ok,
    encode,
    read_headers,
    roundtrip,
    synthetic_case,
    volume_from_headers,
)
from tests.support.tid1500_checks import (
    Group,
    check_deterministic,
    check_pacs_triage_sr,
    check_tid1500_generic,
    children,
    concept,
)
from vocabulary import Priority

pytestmark = [
    pytest.mark.peer,  # dciodvfy and dsrdump are real external tools
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
]

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
LIVER_CT = sorted((TESTDATA / "sr_examples" / "dcmqi_liver_seg").glob("ct_0*.dcm"))
SAGITTAL_MR = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))
SR_EXAMPLES = TESTDATA / "sr_examples"
CHARSET_FILES = [
    path
    for path in sorted((TESTDATA / "charsets").glob("*.dcm"))
    if "PatientName" in pydicom.dcmread(path, stop_before_pixels=True)
]
FINGERPRINT = "sha256:4f2c0d9e-study-fingerprint"
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def abdomen() -> tuple[list[Dataset], Volume]:
    headers = read_headers(ABDOMEN)
    return headers, volume_from_headers(headers)


def validate(
    sr: Dataset, label: str, findings: Findings, sources: list[Dataset], seg: Dataset | None = None
) -> Dataset:
    """dciodvfy, dsrdump, bytes round trip, highdicom parse, project checks; returns the decoded SR."""
    assert_dciodvfy_clean(sr, label)
    assert_dsrdump_ok(sr, label)
    decoded = roundtrip(sr)
    parsed = hd.sr.srread(io.BytesIO(encode(sr)))
    assert isinstance(parsed, hd.sr.Comprehensive3DSR)
    assert isinstance(hd.sr.Comprehensive3DSR.from_dataset(decoded), hd.sr.Comprehensive3DSR)
    check_pacs_triage_sr(decoded, sources=sources, findings=findings, seg=seg)
    return decoded


def groups_by_name(sr: Dataset) -> dict[str, Group]:
    return {group.tracking_identifier: group for group in check_tid1500_generic(sr)}


def code_of(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def test_sr_without_seg_is_valid_tid1500(abdomen: tuple[list[Dataset], Volume]) -> None:
    headers, volume = abdomen
    _, findings = synthetic_case(volume)
    sr = write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    decoded = validate(sr, "abdomen SR", findings, headers)

    assert decoded.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert decoded.Modality == "SR" and decoded.PatientName == headers[0].PatientName
    assert "SpecificCharacterSet" not in decoded  # all ASCII: default repertoire
    assert (decoded.ContentDate, decoded.ContentTime) == ("20240506", "070809")
    assert (decoded.PreliminaryFlag, decoded.CompletionFlag) == ("PRELIMINARY", "COMPLETE")
    assert decoded.file_meta.ImplementationVersionName == "PACS_TRIAGE_01"
    procedures = [code_of(item) for item in children(decoded) if concept(item) == ("121058", "DCM")]
    assert procedures == [("25045-6", "LN")]
    summary = [item for item in children(decoded) if concept(item) == ("121111", "DCM")]
    assert [item.TextValue for item in summary] == [findings.summary]

    groups = groups_by_name(decoded)
    for finding in findings.findings:
        group = groups[finding.tracking_identifier]
        points = [item for item in children(group.item) if item.get("ValueType") == "SCOORD3D"]
        assert len(points) == 1 and points[0].GraphicType == "POINT"
        assert points[0].ReferencedFrameOfReferenceUID == volume.frame_of_reference_uid
        np.testing.assert_allclose(np.asarray(points[0].GraphicData, float), finding.centroid_lps, atol=1e-3)
        purpose = [code_of(item) for item in children(group.item) if concept(item) == ("130400", "DCM")]
        assert purpose == [("128138", "DCM")]  # Center of Mass
        # the point's source image is the slice that holds the centroid
        k = int(round(np.linalg.solve(volume.affine, [*finding.centroid_lps, 1.0])[2]))
        images = [item for item in children(group.item) if item.get("ValueType") == "IMAGE"]
        assert [img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for img in images] == [
            volume.source_instances[k].sop_instance_uid
        ]
        assert code_of(group.items(("121071", "DCM"))[0]) == (finding.type.value, "SCT")  # type: ignore[union-attr]
        diameters = group.items(("81827009", "SCT"))
        assert diameters[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    lesion = groups["lesion 1"]
    sites = [code_of(item) for item in children(lesion.item) if concept(item) == ("363698007", "SCT")]
    assert sites == [("10200004", "SCT")]

    probability = groups["splenic injury (classification)"].items(("122157", "DCM"))[0]
    assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.87)
    assert probability.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
    (evaluations,) = [item for item in children(decoded) if concept(item) == ("C0034375", "UMLS")]
    assert [code_of(item) for item in children(evaluations)] == [("103391001", "SCT")]  # Urgent

    # highdicom reads back what it would need to show the finding
    report = hd.sr.srread(io.BytesIO(encode(sr))).content
    assert isinstance(report, hd.sr.MeasurementReport)
    roi_groups = report.get_volumetric_roi_measurement_groups()
    assert {g.tracking_identifier for g in roi_groups} == {"spleen 1", "lesion 1"}
    surfaces = [g.roi for g in roi_groups]
    assert all(
        isinstance(s, hd.sr.VolumeSurface) and s.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        for s in surfaces
    )


def test_sr_references_the_seg_segments(abdomen: tuple[list[Dataset], Volume]) -> None:
    headers, volume = abdomen
    labels, findings = synthetic_case(volume)
    seg = write_seg(labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    sr = write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, seg=seg, content_datetime=WHEN)
    decoded = validate(sr, "abdomen SR + SEG", findings, headers, seg=seg)

    segment_by_tracking_uid = {str(s.TrackingUID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    groups = groups_by_name(decoded)
    for label, finding in enumerate(findings.findings, start=1):
        group = groups[finding.tracking_identifier]
        referenced = [item for item in children(group.item) if concept(item) == ("121191", "DCM")]
        assert len(referenced) == 1, f"{finding.name}: one Referenced Segment"
        ref = referenced[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(ref.ReferencedSegmentNumber) == segment_by_tracking_uid[group.tracking_uid]
        # Source images for segmentation: exactly the slices that hold the label
        sources = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in children(group.item)
            if concept(item) == ("121233", "DCM")
        }
        slices = np.unique(np.argwhere(labels == label)[:, 2])
        assert sources == {volume.source_instances[k].sop_instance_uid for k in slices}
        # TID 1411 allows one ROI (the segment); the lesion's centroid follows as a POINT
        points = [item for item in children(group.item) if item.get("ValueType") == "SCOORD3D"]
        assert [(concept(p), p.GraphicType) for p in points] == [(("128138", "DCM"), "POINT")]

    report = hd.sr.srread(io.BytesIO(encode(sr))).content
    assert isinstance(report, hd.sr.MeasurementReport)
    for roi_group in report.get_volumetric_roi_measurement_groups():
        assert roi_group.reference_type == hd.sr.CodedConcept("121191", "DCM", "Referenced Segment")
        assert roi_group.referenced_segment is not None


def test_uids_are_deterministic(abdomen: tuple[list[Dataset], Volume]) -> None:
    headers, volume = abdomen
    labels, findings = synthetic_case(volume)

    def make() -> Dataset:
        return write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN)

    first = check_deterministic(make)
    assert encode(first) == encode(make()), "same inputs and time: byte-identical SR"
    expected = result_uids(FINGERPRINT, ALGORITHM, "sr")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        expected.series_instance_uid,
        expected.sop_instance_uid,
    )
    seg = write_seg(labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    assert len({first.SeriesInstanceUID, seg.SeriesInstanceUID, headers[0].SeriesInstanceUID}) == 3

    other_input = write_sr(
        findings, headers, volume, input_fingerprint=FINGERPRINT + "-late-instance", content_datetime=WHEN
    )
    newer_bundle = Findings(
        algorithm=dataclasses.replace(ALGORITHM, version="0.3.2"),
        findings=findings.findings,
        priority=findings.priority,
    )
    other_version = write_sr(
        newer_bundle, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN
    )
    uids = {ds.SOPInstanceUID for ds in (first, other_input, other_version)}
    assert len(uids) == 3, "a new fingerprint or bundle version is a new report"
    tracking = {g.tracking_uid for g in check_tid1500_generic(roundtrip(first))}
    assert tracking == {g.tracking_uid for g in check_tid1500_generic(roundtrip(make()))}


def _charset_headers(charset_file: Path) -> tuple[list[Dataset], Dataset]:
    """Real CT headers re-encoded as if the patient were the one in ``charset_file``."""
    person = pydicom.dcmread(charset_file, stop_before_pixels=True)
    text = [group for group in str(person.PatientName).split("=") if group][-1].replace("^", " ")
    headers: list[Dataset] = []
    for ds in read_headers(LIVER_CT):
        ds.SpecificCharacterSet = person.SpecificCharacterSet
        ds.PatientName = person.PatientName
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "X1", "99LOCAL", text
        ds.ProcedureCodeSequence = [code]
        buffer = io.BytesIO()
        ds.save_as(buffer)  # raw bytes in the source character set
        headers.append(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    return headers, person


@pytest.mark.parametrize("charset_file", CHARSET_FILES, ids=lambda path: path.stem)
def test_patient_name_round_trips_in_every_character_set(charset_file: Path) -> None:
    headers, person = _charset_headers(charset_file)
    volume = volume_from_headers(headers)
    _, findings = synthetic_case(volume)
    sr = write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    decoded = validate(sr, charset_file.stem, findings, headers)

    assert decoded.SpecificCharacterSet == "ISO_IR 192"
    assert str(decoded.PatientName) == str(person.PatientName)
    assert decoded.ProcedureCodeSequence[0].CodeMeaning == headers[0].ProcedureCodeSequence[0].CodeMeaning


def test_sagittal_mr_report() -> None:
    headers = read_headers(SAGITTAL_MR)
    volume = volume_from_headers(headers)
    _, findings = synthetic_case(volume)
    sr = write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    decoded = validate(sr, "sagittal MR SR", findings, headers)
    procedures = [code_of(item) for item in children(decoded) if concept(item) == ("121058", "DCM")]
    assert procedures == [("25056-3", "LN")]


def test_report_without_findings_and_with_a_degenerate_finding(abdomen: tuple[list[Dataset], Volume]) -> None:
    headers, volume = abdomen
    empty = Findings(algorithm=ALGORITHM)
    decoded = validate(
        write_sr(empty, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN),
        "empty",
        empty,
        headers,
    )
    assert check_tid1500_generic(decoded) == []  # nothing measured: no group at all
    (evaluations,) = [item for item in children(decoded) if concept(item) == ("C0034375", "UMLS")]
    assert [code_of(item) for item in children(evaluations)] == [("50811001", "SCT")]  # Routine
    assert not [item for item in children(decoded) if concept(item) == ("121111", "DCM")]

    nothing = Finding(label=3, name="fluid", volume_ml=0.0, largest_diameter_mm=0.0,
                      centroid_lps=(float("nan"),) * 3)  # fmt: skip
    critical = Findings(algorithm=ALGORITHM, findings=(nothing,), priority=Priority.STAT, summary="STAT")
    decoded = validate(
        write_sr(critical, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN),
        "degenerate",
        critical,
        headers,
    )
    group = groups_by_name(decoded)["fluid 1"]
    assert group.item.ContentTemplateSequence[0].TemplateIdentifier == "1501"  # no ROI to reference
    (evaluations,) = [item for item in children(decoded) if concept(item) == ("C0034375", "UMLS")]
    assert [code_of(item) for item in children(evaluations)] == [("49499008", "SCT")]  # Stat


@pytest.mark.parametrize(
    "example",
    ["highdicom/sr_document.dcm", "highdicom/sr_document_with_multiple_groups.dcm", "dcmqi_tid1500/sr.dcm"],
)
def test_generic_checks_pass_on_real_tid1500_examples(example: str) -> None:
    groups = check_tid1500_generic(pydicom.dcmread(SR_EXAMPLES / example))
    assert groups and all(UID(g.tracking_uid).is_valid for g in groups)


def test_rejects_sources_that_do_not_match_the_volume(abdomen: tuple[list[Dataset], Volume]) -> None:
    headers, volume = abdomen
    _, findings = synthetic_case(volume)
    other_study = [copy.deepcopy(ds) for ds in headers]
    other_study[3].StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="study"):
        write_sr(findings, other_study, volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    with pytest.raises(ValueError, match=headers[0].SOPInstanceUID):
        write_sr(findings, headers[1:], volume, input_fingerprint=FINGERPRINT, content_datetime=WHEN)


def test_codes_are_the_standard_ones() -> None:
    """Every DCM/SCT/LN/UCUM code we emit has the value PS3.16 (via pydicom's dictionary) gives it."""
    emitted = [v for v in vars(codes).values() if isinstance(v, PydicomCode)]
    emitted += list(codes.PROCEDURE_BY_MODALITY.values()) + list(codes.PRIORITY_VALUES.values())
    unknown = {
        (c.scheme_designator, c.value)
        for c in emitted
        if c.scheme_designator != codes.PRIVATE_SCHEME
        and (
            not hasattr(dicom_codes, c.scheme_designator)
            or c not in getattr(dicom_codes, c.scheme_designator)
        )
    }
    # SNOMED CT 272125009 |Priorities| descendants that DICOM's SNOMED subset does not list; "ml" is
    # listed by UCUM, not in pydicom's subset.
    # TID 1500's "Qualitative Evaluations" container (UMLS) and IHE AIR's interim "Processing
    # Algorithm" (99IHE) are not in pydicom's dictionary either.
    assert unknown == {
        ("SCT", "50811001"),
        ("SCT", "49499008"),
        ("UCUM", "ml"),
        ("UMLS", "C0034375"),
        ("99IHE", "Newcode1"),
    }
    assert set(codes.PRIORITY_VALUES) == set(Priority)


def test_derive_uid() -> None:
    uid = derive_uid("a", "b")
    assert uid == derive_uid("a", "b") and uid.startswith("2.25.")
    assert UID(uid).is_valid and len(uid) <= 64
    assert derive_uid("ab", "c") != derive_uid("a", "bc") != derive_uid("abc")
    with pytest.raises(ValueError):
        derive_uid()
    with pytest.raises(TypeError):
        derive_uid("a", 1)  # type: ignore[arg-type]
