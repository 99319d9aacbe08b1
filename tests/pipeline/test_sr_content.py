"""What the SR and SEG say, read back as a PACS and a viewer read them (issue 13 items 1-7 and 9).

Every object is built from a real CT series, read back with highdicom AND with dcmtk's dsr2xml,
and checked by dciodvfy. The case: two lesions of a "liver lesion" label (and a speck below the
pipeline's minimum size), a classifier whose channel 0 is a background score.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import xml.etree.ElementTree as ET

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from pipeline.demo.bundle import demo_spec
from pipeline.findings import AlgorithmInfo, Findings
from pipeline.measure import classifications, measure_lesions
from pipeline.uids import ResultSeries, model_device_uid
from pipeline.volume import Volume
from pipeline.writers.seg import write_seg
from pipeline.writers.sr import write_sr
from pipeline.writers.sr_reader import read_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import (
    ALGORITHM,
    assert_dciodvfy_clean,
    assert_dsrdump_ok,
    dsr2xml,
    encode,
    read_headers,
    roundtrip,
    volume_from_headers,
)
from vocabulary import Priority

pytestmark = [pytest.mark.peer]  # dciodvfy, dsrdump and dsr2xml are real external tools

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
FINGERPRINT = "sha256:two-lesion-study"
WHEN = datetime.datetime(2026, 12, 3, 9, 41, 7)  # when the analysis began
CLASSIFIER = AlgorithmInfo(name="lesion_cls", version="0.1.0", sha256="c" * 64, pipeline="ct-abdomen")
LABEL_NAMES = ("background", "liver lesion")
CLASS_NAMES = ("background (max. mean probability in a 7.5 mm cube)", "lesion present")
REPORTED = frozenset({"liver lesion", "lesion present"})
MIN_LESION_ML = 0.1
PROCESSING_ALGORITHM = ("Newcode1", "99IHE")


@dataclasses.dataclass(frozen=True)
class Case:
    headers: list[Dataset]
    volume: Volume
    findings: Findings
    lesion_map: np.ndarray
    sr: Dataset
    seg: Dataset
    sr_without_seg: Dataset
    big_voxels: int
    small_voxels: int


def _build(headers: list[Dataset], volume: Volume, when: datetime.datetime = WHEN) -> Case:
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[100:140, 120:150, 4:12] = 1  # lesion of 9600 voxels
    labels[300:312, 280:290, 14:17] = 1  # lesion of 360 voxels, far from the first
    labels[450, 450, 18] = 1  # one voxel: below the minimum size, not a lesion
    probabilities = np.zeros((2, *labels.shape), dtype=np.float32)
    probabilities[1][labels == 1] = 0.9
    found, lesion_map = measure_lesions(
        labels,
        volume,
        LABEL_NAMES,
        probabilities=probabilities,
        min_volume_ml=MIN_LESION_ML,
        reported=REPORTED,
    )
    classes = classifications(CLASS_NAMES, (0.99, 0.01), algorithm=CLASSIFIER, reported=REPORTED)
    findings = Findings(
        algorithm=ALGORITHM, findings=found, classifications=classes, priority=Priority.ROUTINE, summary="x"
    )
    seg = write_seg(
        lesion_map, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=when
    )
    sr = write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, seg=seg, content_datetime=when)
    bare = write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, content_datetime=when)
    return Case(headers, volume, findings, lesion_map, sr, seg, bare, 40 * 30 * 8, 12 * 10 * 3)


@pytest.fixture(scope="module")
def case() -> Case:
    headers = read_headers(ABDOMEN)
    return _build(headers, volume_from_headers(headers))


def _items(element: ET.Element) -> list[ET.Element]:
    return element.findall("item")


def _concept(item: ET.Element) -> tuple[str, str]:
    concept = item.find("concept")
    assert concept is not None
    return (concept.get("codValue", ""), concept.get("codScheme", ""))


def _value(item: ET.Element) -> str:
    value = item.find("value")
    return "" if value is None else (value.text or "")


def _root(xml: ET.Element) -> ET.Element:
    root = xml.find("document/content/item")
    assert root is not None, "dsr2xml shows no content"
    return root


def _groups(xml: ET.Element) -> dict[str, ET.Element]:
    """Measurement groups by tracking identifier, as dsr2xml shows them."""
    (measurements,) = [i for i in _items(_root(xml)) if _concept(i) == ("126010", "DCM")]
    groups = {}
    for group in _items(measurements):
        assert _concept(group) == ("125007", "DCM")
        (identifier,) = [i for i in _items(group) if _concept(i) == ("112039", "DCM")]
        groups[_value(identifier)] = group
    return groups


def _in(group: ET.Element, concept: tuple[str, str]) -> list[ET.Element]:
    return [i for i in _items(group) if _concept(i) == concept]


def _report(sr: Dataset) -> hd.sr.MeasurementReport:
    parsed = hd.sr.srread(io.BytesIO(encode(sr)))
    assert isinstance(parsed, hd.sr.Comprehensive3DSR)
    content = parsed.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def test_the_objects_pass_the_validators(case: Case) -> None:
    for sr in (case.sr, case.sr_without_seg):
        assert_dciodvfy_clean(sr, "SR")
        assert_dsrdump_ok(sr, "SR")
    assert_dciodvfy_clean(case.seg, "SEG")


def test_1_each_group_names_the_model_that_produced_it(case: Case) -> None:
    groups = _groups(dsr2xml(case.sr))
    expected = {
        "liver lesion 1": ALGORITHM,
        "liver lesion 2": ALGORITHM,
        "lesion present (classification)": CLASSIFIER,
    }
    assert set(groups) == set(expected)
    for identifier, algorithm in expected.items():
        group = groups[identifier]
        assert [_value(i) for i in _in(group, ("111001", "DCM"))] == [algorithm.name], identifier
        assert [_value(i) for i in _in(group, ("111003", "DCM"))] == [algorithm.version], identifier
        assert f"sha256={algorithm.sha256}" in [_value(i) for i in _in(group, ("111002", "DCM"))], identifier
    # highdicom reads the same identification back
    report = _report(case.sr)
    (classification,) = report.get_image_measurement_groups()
    names = [
        item.TextValue
        for item in classification[0].ContentSequence
        if item.name == hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
    ]
    assert names == [CLASSIFIER.name]
    assert {f.algorithm_name for f in read_sr(roundtrip(case.sr)).findings} == {ALGORITHM.name}
    assert [c.algorithm_name for c in read_sr(roundtrip(case.sr)).classifications] == [CLASSIFIER.name]


def test_2_only_the_declared_findings_are_reported(case: Case) -> None:
    report = read_sr(roundtrip(case.sr))
    assert [c.name for c in report.classifications] == ["lesion present"]
    assert not [name for name in _groups(dsr2xml(case.sr)) if "background" in name]
    assert "background" not in report.summary
    # the demo pipeline declares its findings: the lesion channel and the "lesion present" class
    assert demo_spec().reported == frozenset({"lesion", "lesion present"})


def test_3_one_group_per_lesion_with_volume_diameter_centroid_and_tracking(case: Case) -> None:
    voxel_ml = case.volume.voxel_volume_ml
    for sr in (case.sr, case.sr_without_seg):
        xml = dsr2xml(sr)
        groups = _groups(xml)
        lesions = [groups["liver lesion 1"], groups["liver lesion 2"]]
        uids = set()
        for group, voxels, finding in zip(
            lesions, (case.big_voxels, case.small_voxels), case.findings.findings, strict=True
        ):
            (volume,) = [i for i in _in(group, ("118565006", "SCT")) if _method(i) == ("126030", "DCM")]
            assert float(_value(volume)) == pytest.approx(voxels * voxel_ml, rel=5e-3)
            assert len(_in(group, ("81827009", "SCT"))) == 1  # the longest diameter
            (site,) = _in(group, ("363698007", "SCT"))
            assert site.find("value") is not None and site.find("value").get("codValue") == "10200004"  # type: ignore[union-attr]
            points = [i for i in _items(group) if i.get("valType") == "SCOORD3D"]
            assert len(points) == 1, "one centroid per lesion"
            assert points[0].get("type") == "POINT"
            data = points[0].find("data")
            assert data is not None and data.text is not None
            assert data.get("uid") == case.volume.frame_of_reference_uid
            xyz = [float(v) for v in data.text.replace("/", ",").split(",")]
            np.testing.assert_allclose(xyz, finding.centroid_lps, atol=0.01)
            (uid,) = _in(group, ("112040", "DCM"))
            uids.add(_value(uid))
        assert len(uids) == 2
    # the speck is no lesion; the SEG has exactly the two lesions, tracked like the SR groups
    assert [f.tracking_identifier for f in case.findings.findings] == ["liver lesion 1", "liver lesion 2"]
    segments = {str(s.TrackingID): str(s.TrackingUID) for s in case.seg.SegmentSequence}
    assert segments == {
        g.tracking_identifier: g.tracking_uid
        for g in _report(case.sr).get_volumetric_roi_measurement_groups()
    }
    # deterministic: the same input gives the same tracking UIDs, whatever the analysis time
    again = _build(case.headers, case.volume, when=WHEN + datetime.timedelta(hours=5))
    assert {str(s.TrackingUID) for s in again.seg.SegmentSequence} == set(segments.values())
    report = read_sr(roundtrip(case.sr_without_seg))
    assert [(f.identifier, f.name) for f in report.findings] == [
        ("liver lesion 1", "liver lesion"),
        ("liver lesion 2", "liver lesion"),
    ]
    assert all(f.centroid_lps is not None for f in report.findings)
    # highdicom: two volumetric groups, each a lesion
    rois = _report(case.sr_without_seg).get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in rois] == ["liver lesion 1", "liver lesion 2"]
    assert all(isinstance(g.roi, hd.sr.VolumeSurface) for g in rois)


def _method(num: ET.Element) -> tuple[str, str] | None:
    for child in _items(num):
        if _concept(child) == ("370129005", "SCT"):
            value = child.find("value")
            assert value is not None
            return (value.get("codValue", ""), value.get("codScheme", ""))
    return None


def test_4_the_volume_is_the_seg_voxels_with_the_method_coded(case: Case) -> None:
    voxel_ml = case.volume.voxel_volume_ml
    frames = case.seg.pixel_array.reshape(-1, int(case.seg.Rows), int(case.seg.Columns))
    per_segment: dict[int, int] = {}
    for index, item in enumerate(case.seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        per_segment[number] = per_segment.get(number, 0) + int(np.count_nonzero(frames[index]))
    groups = _groups(dsr2xml(case.sr))
    for number, segment in enumerate(case.seg.SegmentSequence, start=1):
        group = groups[str(segment.TrackingID)]
        volumes = {_method(i): float(_value(i)) for i in _in(group, ("118565006", "SCT"))}
        assert set(volumes) == {("126030", "DCM"), ("PROBSUM", "99PTRIAGE")}
        assert volumes[("126030", "DCM")] == pytest.approx(per_segment[number] * voxel_ml, rel=5e-3)
    report = _report(case.sr)
    for roi in report.get_volumetric_roi_measurement_groups():
        methods = {
            m.method.value if m.method else None
            for m in roi.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        }
        assert methods == {"126030", "PROBSUM"}


def test_5_content_and_creation_time_are_the_analysis_time(case: Case) -> None:
    for ds in (case.sr, case.seg):
        ds = roundtrip(ds)
        assert (str(ds.ContentDate), str(ds.ContentTime)) == ("20261203", "094107")
        assert (str(ds.InstanceCreationDate), str(ds.InstanceCreationTime)) == ("20261203", "094107")
    creation = dsr2xml(case.sr).find("instance/creation")
    assert creation is not None
    assert (creation.findtext("date"), creation.findtext("time")) == ("2026-12-03", "09:41:07")
    later = _build(case.headers, case.volume, when=WHEN + datetime.timedelta(days=1))
    assert str(later.sr.ContentDate) == "20261204"
    assert (later.sr.SOPInstanceUID, later.seg.SOPInstanceUID) == (
        case.sr.SOPInstanceUID,
        case.seg.SOPInstanceUID,
    )


def test_6_priority_is_a_document_level_evaluation_and_probability_has_a_subject(case: Case) -> None:
    xml = dsr2xml(case.sr)
    root = _root(xml)
    (evaluations,) = [i for i in _items(root) if _concept(i) == ("C0034375", "UMLS")]
    (priority,) = _in(evaluations, ("260870009", "SCT"))
    assert priority.get("valType") == "CODE"
    assert priority.find("value").get("codValue") == "50811001"  # type: ignore[union-attr]  # Routine
    for identifier, group in _groups(xml).items():
        assert not _in(group, ("260870009", "SCT")), f"{identifier}: priority inside a measurement group"
    classification = _groups(xml)["lesion present (classification)"]
    (subject,) = _in(classification, ("121071", "DCM"))
    assert subject.find("value").get("codValue") == "52988006"  # type: ignore[union-attr]  # Lesion
    assert read_sr(roundtrip(case.sr)).priority is Priority.ROUTINE
    (measured,) = _report(case.sr).get_image_measurement_groups()
    assert measured.finding_type == hd.sr.CodedConcept("52988006", "SCT", "Lesion")


def _significant_digits(text: str) -> int:
    digits = text.lstrip("+-").replace(".", "").lstrip("0")
    return len(digits.rstrip("0")) if "." not in text else len(digits)


def test_7_numbers_without_false_precision_series_numbers_and_no_family_evaluation(case: Case) -> None:
    values = []
    stack = list(roundtrip(case.sr).ContentSequence)
    while stack:
        item = stack.pop()
        stack.extend(item.get("ContentSequence", []))
        if item.get("ValueType") == "NUM" and item.get("MeasuredValueSequence"):
            concept = item.ConceptNameCodeSequence[0].CodeValue
            if concept in ("118565006", "81827009", "122157"):
                number = item.MeasuredValueSequence[0].NumericValue
                values.append((concept, getattr(number, "original_string", None) or str(number)))
    assert values
    for concept, text in values:
        allowed = 2 if concept == "122157" else 3
        assert _significant_digits(text) <= allowed, f"{concept}: {text!r} has false precision"
    numbers = [int(n) for n in ResultSeries]
    assert len(set(numbers)) == len(numbers)
    assert case.sr.SeriesNumber == ResultSeries.SR and case.seg.SeriesNumber == ResultSeries.SEG
    for roi in _report(case.sr).get_volumetric_roi_measurement_groups():
        names = [e.name for e in roi.get_qualitative_evaluations()]
        assert hd.sr.CodedConcept("111000", "DCM", "Algorithm Family") not in names


def test_9_every_result_names_its_models_as_contributing_equipment(case: Case) -> None:
    def processing(ds: Dataset) -> dict[str, Dataset]:
        items = {}
        for item in ds.ContributingEquipmentSequence:
            code = item.PurposeOfReferenceCodeSequence[0]
            if (code.CodeValue, code.CodingSchemeDesignator) == PROCESSING_ALGORITHM:
                assert code.CodeMeaning == "Processing Algorithm"
                items[str(item.ManufacturerModelName)] = item
        return items

    sr_models, seg_models = processing(roundtrip(case.sr)), processing(roundtrip(case.seg))
    assert set(sr_models) == {ALGORITHM.name, CLASSIFIER.name}
    assert set(seg_models) == {ALGORITHM.name}
    for algorithm in (ALGORITHM, CLASSIFIER):
        item = sr_models[algorithm.name]
        assert item.Manufacturer and algorithm.version in list(item.SoftwareVersions)
        assert item.DeviceUID == model_device_uid(algorithm)
        assert item.ContributionDateTime == "20261203094107"
    assert seg_models[ALGORITHM.name].DeviceUID == model_device_uid(ALGORITHM)
    retrained = dataclasses.replace(ALGORITHM, sha256="d" * 64)
    assert model_device_uid(retrained) != model_device_uid(ALGORITHM)
    assert model_device_uid(dataclasses.replace(ALGORITHM, pipeline="other")) == model_device_uid(ALGORITHM)
