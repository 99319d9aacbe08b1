"""SEG writer: the segmentation lies on the source grid, validates, and carries our codes and UIDs.

The orientation check is done twice, independently of our own code: against a real SEG that dcmqi
made on real CT (same mask in, same per-image masks out), and by mapping every SEG pixel to patient
coordinates with the PS3.3 C.7.6.2.1.1 equation from the SEG's own per-frame geometry.
"""

from __future__ import annotations

import dataclasses
import datetime
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pipeline.findings import Findings
from pipeline.uids import DEVICE_OBSERVER_UID, finding_tracking_uid, result_uids
from pipeline.volume import Volume
from pipeline.writers.seg import write_seg
from pipeline.writers.sr import write_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import (
    ALGORITHM,
    assert_dciodvfy_clean,
    encode,
    read_headers,
    roundtrip,
    synthetic_case,
    volume_from_headers,
)
from tests.support.tid1500_checks import check_deterministic

pytestmark = [
    pytest.mark.peer,  # dciodvfy
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
]

LIVER = TESTDATA / "sr_examples" / "dcmqi_liver_seg"
GANTRY_TILT = [TESTDATA / "ct_series" / "gantry_tilt" / f"GE_{n:02d}.dcm" for n in range(1, 6)]
ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
FINGERPRINT = "sha256:seg-test-fingerprint"
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def tilted() -> tuple[list[Dataset], Volume]:
    headers = read_headers(GANTRY_TILT)
    return headers, volume_from_headers(headers)


def validated(seg: Dataset, label: str) -> tuple[Dataset, hd.seg.Segmentation]:
    """dciodvfy, then a bytes round trip read by pydicom and by highdicom."""
    assert_dciodvfy_clean(seg, label)
    decoded = roundtrip(seg)
    parsed = hd.seg.segread(io.BytesIO(encode(seg)))
    assert parsed.SOPInstanceUID == seg.SOPInstanceUID
    return decoded, parsed


def frame_sources(seg: Dataset) -> list[str]:
    """SOP Instance UID of the source image each frame derives from (PS3.3 C.7.6.16.2.6)."""
    return [
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]


def test_same_mask_as_dcmqi_on_real_ct() -> None:
    """dcmqi's liver SEG -> label volume [i, j, k] -> our SEG: identical mask on every CT image."""
    headers = read_headers(sorted(LIVER.glob("ct_0*.dcm")))
    volume = volume_from_headers(headers)
    reference = hd.seg.segread(LIVER / "liver_seg.dcm")
    uids = [ref.sop_instance_uid for ref in volume.source_instances]
    # dcmqi does not declare Spatial Locations Preserved; its frames do lie on the CT images
    masks = reference.get_pixels_by_source_instance(uids, segment_numbers=[1], ignore_spatial_locations=True)[
        ..., 0
    ]
    assert masks.any()
    labels = np.transpose(masks, (2, 1, 0)).astype(np.uint8)  # -> [i=column, j=row, k]
    _, findings = synthetic_case(volume)
    liver = dataclasses.replace(findings.findings[0], label=1, name="liver")
    findings = dataclasses.replace(findings, findings=(liver,))

    seg = write_seg(labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    decoded, parsed = validated(seg, "liver SEG")
    ours = parsed.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(ours, masks)

    theirs_ipp = {
        src: frame.PlanePositionSequence[0].ImagePositionPatient
        for src, frame in zip(
            frame_sources(reference), reference.PerFrameFunctionalGroupsSequence, strict=True
        )
    }
    for src, frame in zip(frame_sources(decoded), decoded.PerFrameFunctionalGroupsSequence, strict=True):
        np.testing.assert_allclose(
            np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float),
            np.asarray(theirs_ipp[src], float),
            atol=1e-3,
        )


def test_every_seg_pixel_lands_on_its_voxel_on_a_tilted_grid(tilted: tuple[list[Dataset], Volume]) -> None:
    headers, volume = tilted
    assert abs(float(headers[0].GantryDetectorTilt)) > 10  # the sheared case
    labels, findings = synthetic_case(volume)
    seg = write_seg(labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    decoded, _ = validated(seg, "tilted SEG")

    k_of = {ref.sop_instance_uid: k for k, ref in enumerate(volume.source_instances)}
    shared = decoded.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = decoded.pixel_array.reshape(-1, decoded.Rows, decoded.Columns)
    seen = np.zeros_like(labels)
    for f, frame in enumerate(decoded.PerFrameFunctionalGroupsSequence):
        k = k_of[frame_sources(decoded)[f]]
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        label = findings.findings[segment - 1].label
        rows, cols = np.nonzero(pixels[f])
        np.testing.assert_array_equal(labels[cols, rows, k], label)  # frame[row=j, col=i] is voxel [i, j, k]
        seen[cols, rows, k] = label
        ipp = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        patient = ipp + np.outer(cols, iop[:3] * column_spacing) + np.outer(rows, iop[3:] * row_spacing)
        expected = volume.index_to_patient(np.column_stack([cols, rows, np.full_like(rows, k)]))
        np.testing.assert_allclose(patient, expected, atol=1e-3)
    np.testing.assert_array_equal(seen, labels)  # nothing lost, nothing extra


def test_segment_descriptions_carry_codes_algorithm_and_tracking(
    tilted: tuple[list[Dataset], Volume],
) -> None:
    headers, volume = tilted
    labels, findings = synthetic_case(volume)
    seg = write_seg(labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
    decoded, _ = validated(seg, "tilted SEG descriptions")

    assert decoded.StudyInstanceUID == headers[0].StudyInstanceUID
    assert decoded.SeriesInstanceUID not in {
        headers[0].SeriesInstanceUID,
        result_uids(FINGERPRINT, ALGORITHM, "sr").series_instance_uid,
    }
    assert decoded.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert (decoded.PatientID, decoded.PatientName) == (headers[0].PatientID, headers[0].PatientName)
    assert decoded.SegmentationType == "BINARY" and decoded.DeviceSerialNumber == DEVICE_OBSERVER_UID
    assert decoded.ContentDate == "20240506" and "CodingSchemeIdentificationSequence" not in decoded
    assert decoded.file_meta.ImplementationVersionName == "PACS_TRIAGE_01"
    assert len(decoded.SegmentSequence) == len(findings.findings)
    for number, (item, finding) in enumerate(
        zip(decoded.SegmentSequence, findings.findings, strict=True), start=1
    ):
        assert int(item.SegmentNumber) == number and item.SegmentLabel == finding.tracking_identifier
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, kind.CodeValue) == (finding.category.value, finding.type.value)  # type: ignore[union-attr]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (ALGORITHM.name, ALGORITHM.version)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
        assert ALGORITHM.sha256 in algorithm.AlgorithmParameters
        assert item.TrackingUID == finding_tracking_uid(FINGERPRINT, ALGORITHM, finding)
        if finding.finding_site is not None:
            assert item.AnatomicRegionSequence[0].CodeValue == finding.finding_site.value

    # the SR's measurement group and the SEG segment share the tracking UID
    sr = write_sr(findings, headers, volume, input_fingerprint=FINGERPRINT, seg=seg, content_datetime=WHEN)
    report = hd.sr.srread(io.BytesIO(encode(sr))).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert {str(g.tracking_uid) for g in report.get_volumetric_roi_measurement_groups()} == {
        str(item.TrackingUID) for item in decoded.SegmentSequence
    }


def test_uncoded_findings_use_the_declared_local_scheme(tilted: tuple[list[Dataset], Volume]) -> None:
    headers, volume = tilted
    labels, findings = synthetic_case(volume, coded=False)
    decoded, _ = validated(
        write_seg(labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN),
        "uncoded",
    )
    schemes = [item.CodingSchemeDesignator for item in decoded.CodingSchemeIdentificationSequence]
    assert schemes == ["99PTRIAGE"]
    kind = decoded.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
        "LABEL-1",
        "99PTRIAGE",
        "spleen",
    )


def test_seg_uids_are_deterministic(tilted: tuple[list[Dataset], Volume]) -> None:
    headers, volume = tilted
    labels, findings = synthetic_case(volume)

    def make() -> Dataset:
        return write_seg(
            labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN
        )

    first = check_deterministic(make)
    assert encode(first) == encode(make())
    expected = result_uids(FINGERPRINT, ALGORITHM, "seg")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        expected.series_instance_uid,
        expected.sop_instance_uid,
    )
    other = write_seg(
        labels,
        volume,
        headers,
        findings,
        input_fingerprint=FINGERPRINT + "-rerun-with-more-images",
        content_datetime=WHEN,
    )
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_non_ascii_patient_name_round_trips() -> None:
    headers = read_headers(sorted(LIVER.glob("ct_0*.dcm")))
    person = pydicom.dcmread(TESTDATA / "charsets" / "chrH31.dcm", stop_before_pixels=True)
    for ds in headers:
        ds.SpecificCharacterSet, ds.PatientName = person.SpecificCharacterSet, person.PatientName
    volume = volume_from_headers(headers)
    labels, findings = synthetic_case(volume)
    decoded, _ = validated(
        write_seg(labels, volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN),
        "chrH31",
    )
    assert decoded.SpecificCharacterSet == "ISO_IR 192"
    assert str(decoded.PatientName) == str(person.PatientName)


def test_rejects_inputs_that_do_not_line_up(tilted: tuple[list[Dataset], Volume]) -> None:
    headers, volume = tilted
    labels, findings = synthetic_case(volume)
    with pytest.raises(ValueError, match="shape"):
        write_seg(
            labels[:, :, :-1], volume, headers, findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN
        )
    with pytest.raises(ValueError, match="volume order"):
        write_seg(
            labels, volume, headers[::-1], findings, input_fingerprint=FINGERPRINT, content_datetime=WHEN
        )
    with pytest.raises(ValueError, match="integer"):
        write_seg(
            labels.astype(float),
            volume,
            headers,
            findings,
            input_fingerprint=FINGERPRINT,
            content_datetime=WHEN,
        )
    with pytest.raises(ValueError, match="nothing to segment"):
        write_seg(
            np.zeros_like(labels),
            volume,
            headers,
            findings,
            input_fingerprint=FINGERPRINT,
            content_datetime=WHEN,
        )
    twice = Findings(algorithm=ALGORITHM, findings=(findings.findings[0], findings.findings[0]))
    with pytest.raises(ValueError, match="not distinct lesions"):
        write_seg(labels, volume, headers, twice, input_fingerprint=FINGERPRINT, content_datetime=WHEN)
