"""Findings -> a Comprehensive 3D SR (PS3.3 A.35.13) holding a PS3.16 TID 1500 Measurement Report.

Document tree (one row per content item kind; template ids from PS3.16):

    CONTAINER (126000, DCM, "Imaging Measurement Report")             TID 1500
      language, observation context: device observer (TID 1002/1004)
      "Procedure reported": CID 100 code for the series' Modality
      Image Library (TID 1600): one IMAGE entry per source image; modality and frame of reference
                       once per group (entry descriptors are optional: pipeline.writers.image_library)
      Imaging Measurements
        per finding    TID 1411 Volumetric ROI group: tracking identifier and UID (TID 4108),
                       finding category / type / site, TID 4019 algorithm identification,
                       ROI = the SEG segment (Referenced Segment) when a SEG was written, else the
                       centroid as a SCOORD3D POINT with geometric purpose "Center of Mass"
                       (CID 219) in the slice that holds it; NUM Volume (ml), NUM Diameter (mm,
                       derivation Maximum)
        per classification  TID 1501 group: NUM Probability (UCUM "1")
        triage          TID 1501 group: CODE Priority = Routine / Urgent / Stat (SNOMED CT)
      TEXT (121111, DCM, "Summary"): findings.summary, for viewers that only render text (a row
                       added to TID 1500, which is an extensible template)

Why the centroid is not repeated when a SEG exists: TID 1411 allows exactly one ROI reference per
group (highdicom enforces it), and the segment is the exact region; its centre follows from it.

Patient and study come from the source so the SR lands in the same study; series and instance UIDs
come from ``pipeline.uids`` so a re-run is a duplicate. Text is decoded from the source's character
set and written as ISO_IR 192 (UTF-8) when anything is outside ASCII: every source character set
decodes into it, and our own text may need it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from pipeline import codes
from pipeline.findings import AlgorithmInfo, Classification, Finding, Findings, VolumeMethod
from pipeline.uids import (
    DEVICE_OBSERVER_UID,
    MANUFACTURER,
    PRODUCT_NAME,
    SOFTWARE_VERSION,
    finding_tracking_uid,
    result_uids,
    tracking_uid,
)
from pipeline.volume import InstanceRef, Volume
from pipeline.writers.image_library import insert_image_library
from pipeline.writers.output import OUTPUT_CHARACTER_SET, finalize_output, header_copies

SR_SERIES_NUMBER = 9901


def write_sr(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    volume: Volume,
    *,
    input_fingerprint: str,
    seg: Dataset | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str = "AI triage findings",
    manufacturer: str = MANUFACTURER,
    product_name: str = PRODUCT_NAME,
    software_version: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
    content_datetime: datetime.datetime | None = None,
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR for ``findings`` on ``volume``.

    ``source_datasets`` are the headers of the selected series' instances in volume order (pixel
    data is not needed). ``seg`` is the SEG from ``write_seg`` for the same findings, if one was
    made: each finding's group then references its segment. ``content_datetime`` (from the
    caller, which owns the clock) fixes Content/Instance Creation Date and Time; without it
    highdicom uses the current time. UIDs never depend on it.
    """
    headers = _source_headers(source_datasets, volume)
    if seg is not None:
        _check_seg(seg, volume)
    algorithm = findings.algorithm
    algorithm_id = _algorithm_identification(algorithm)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        _finding_group(f, volume, seg, input_fingerprint, algorithm, algorithm_id) for f in findings.findings
    ]
    groups += [
        _classification_group(c, input_fingerprint, algorithm, algorithm_id) for c in findings.classifications
    ]
    groups.append(_triage_group(findings, input_fingerprint, algorithm_id))

    observer = hd.sr.ObserverContext(
        observer_type=codes.coded(codes.OBSERVER_TYPE_DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name=product_name,
            manufacturer_name=manufacturer,
            model_name=f"{product_name} {software_version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.coded(codes.procedure_reported(volume.modality)),
        imaging_measurements=groups,
        title=codes.coded(codes.IMAGING_MEASUREMENT_REPORT),
    )
    insert_image_library(report[0], headers)
    if findings.summary:
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.coded(codes.SUMMARY),
                value=findings.summary,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )

    uids = result_uids(input_fingerprint, algorithm, "sr")
    evidence: list[Dataset] = [*headers, seg] if seg is not None else headers
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,  # PreliminaryFlag PRELIMINARY: no physician has read it
        is_verified=False,
        institution_name=institution_name,
        series_description=series_description,
        manufacturer_model_name=product_name,
        software_versions=software_version,
        specific_character_set=OUTPUT_CHARACTER_SET,
    )
    finalize_output(sr, content_datetime)
    return sr


def _source_headers(source_datasets: Sequence[Dataset], volume: Volume) -> list[Dataset]:
    """Check the sources against the volume and return header-only copies (no pixel data)."""
    if not source_datasets:
        raise ValueError("write_sr needs the source datasets of the selected series; got none")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    for ds in source_datasets:
        if ds.StudyInstanceUID != volume.study_instance_uid:
            raise ValueError(
                f"source instance {ds.SOPInstanceUID} is in study {ds.StudyInstanceUID}, "
                f"the volume in study {volume.study_instance_uid}"
            )
    for ref in volume.source_instances:
        if ref.sop_instance_uid not in by_uid:
            raise ValueError(
                f"volume slice source {ref.sop_instance_uid} is not among the source datasets of "
                f"series {volume.series_instance_uid}"
            )
    return header_copies(source_datasets)


def _check_seg(seg: Dataset, volume: Volume) -> None:
    if seg.SOPClassUID != SegmentationStorage:
        raise ValueError(
            f"seg {seg.SOPInstanceUID} has SOP Class {seg.SOPClassUID}, not Segmentation Storage"
        )
    if seg.StudyInstanceUID != volume.study_instance_uid:
        raise ValueError(
            f"seg {seg.SOPInstanceUID} is in study {seg.StudyInstanceUID}, "
            f"the volume in study {volume.study_instance_uid}"
        )


def _algorithm_identification(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019: bundle name, version, and the sha256 it is pinned by as a parameter."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"sha256={algorithm.sha256}", f"pipeline={algorithm.pipeline}"],
        family=codes.coded(codes.ALGORITHM_FAMILY),
    )


class _GroupArgs(TypedDict):
    """The arguments a finding's group takes whatever its ROI reference (TID 1411 / TID 1501)."""

    tracking_identifier: hd.sr.TrackingIdentifier
    finding_type: hd.sr.CodedConcept | None
    finding_category: hd.sr.CodedConcept | None
    finding_sites: list[hd.sr.FindingSite] | None
    algorithm_id: hd.sr.AlgorithmIdentification
    measurements: list[hd.sr.Measurement]


def _finding_group(
    finding: Finding,
    volume: Volume,
    seg: Dataset | None,
    input_fingerprint: str,
    algorithm: AlgorithmInfo,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one finding (TID 1501 when it has neither segment nor centroid)."""
    uid = finding_tracking_uid(input_fingerprint, algorithm, finding)
    common: _GroupArgs = {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=uid, identifier=finding.name),
        "finding_type": codes.coded(finding.type) if finding.type is not None else None,
        "finding_category": codes.coded(finding.category) if finding.category is not None else None,
        "finding_sites": (
            [hd.sr.FindingSite(anatomic_location=codes.coded(finding.finding_site))]
            if finding.finding_site is not None
            else None
        ),
        "algorithm_id": algorithm_id,
        "measurements": [
            hd.sr.Measurement(
                name=codes.coded(codes.VOLUME),
                value=finding.volume_ml,
                unit=codes.coded(codes.UNIT_ML),
                # 126030 names voxel counting; a probability-sum estimate has no standard code,
                # so the method is then left out rather than mis-stated.
                method=codes.coded(codes.VOLUME_METHOD)
                if finding.volume_method is VolumeMethod.VOXEL_COUNT
                else None,
            ),
            hd.sr.Measurement(
                name=codes.coded(codes.DIAMETER),
                value=finding.largest_diameter_mm,
                unit=codes.coded(codes.UNIT_MM),
                derivation=codes.coded(codes.MAXIMUM),
            ),
        ],
    }
    segment_number = _segment_number(seg, uid) if seg is not None else None
    if seg is not None and segment_number is not None:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number),
            **common,
        )
    centroid = np.asarray(finding.centroid_lps, dtype=float)
    if finding.volume_ml > 0 and np.all(np.isfinite(centroid)):
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=centroid.reshape(1, 3),
            frame_of_reference_uid=volume.frame_of_reference_uid,
            source_images=[_source_image(_slice_of(volume, centroid))],
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_volume_surface=surface,
            geometric_purpose=codes.coded(codes.CENTER_OF_MASS),
            **common,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(**common)


def _segment_number(seg: Dataset, uid: str) -> int | None:
    """The SEG segment carrying this Tracking UID, if it has any frame (PS3.3 C.8.20.4)."""
    for item in seg.SegmentSequence:
        if item.get("TrackingUID") == uid:
            number = int(item.SegmentNumber)
            frames = seg.get("PerFrameFunctionalGroupsSequence", [])
            if any(
                int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number
                for frame in frames
            ):
                return number
    return None


def _slice_of(volume: Volume, point_lps: np.ndarray) -> InstanceRef:
    """The source image of the slice nearest to a patient-space point."""
    ijk = np.linalg.solve(volume.affine, np.append(point_lps, 1.0))
    k = int(np.clip(np.rint(ijk[2]), 0, len(volume.source_instances) - 1))
    return volume.source_instances[k]


def _source_image(ref: InstanceRef) -> hd.sr.SourceImageForSegmentation:
    return hd.sr.SourceImageForSegmentation(
        referenced_sop_class_uid=ref.sop_class_uid,
        referenced_sop_instance_uid=ref.sop_instance_uid,
        referenced_frame_numbers=[ref.frame_number] if ref.frame_number is not None else None,
    )


def _classification_group(
    classification: Classification,
    input_fingerprint: str,
    algorithm: AlgorithmInfo,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the probability that ``classification.name`` is present (TID 300 NUM)."""
    uid = tracking_uid(input_fingerprint, algorithm, "classification", classification.name)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid, identifier=f"{classification.name} (classification)"
        ),
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(
                name=codes.coded(codes.PROBABILITY),
                value=classification.probability,
                unit=codes.coded(codes.UNIT_NONE),
            )
        ],
    )


def _triage_group(
    findings: Findings, input_fingerprint: str, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the study's triage priority as a coded qualitative evaluation."""
    uid = tracking_uid(input_fingerprint, findings.algorithm, "triage")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier="Triage priority"),
        algorithm_id=algorithm_id,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.coded(codes.PRIORITY),
                value=codes.coded(codes.PRIORITY_VALUES[findings.priority]),
            )
        ],
    )


# -- superseding a delivered report -------------------------------------------------------------

SR_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1.88."  # PS3.4 B.5: every SR Storage SOP Class is 88.x


@dataclass(frozen=True, kw_only=True)
class PreviousReport:
    """A report of ours that a PACS already holds and a new one replaces."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def is_report(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")).startswith(SR_STORAGE_ROOT)


def with_predecessors(sr: Dataset, previous: Sequence[PreviousReport]) -> Dataset:
    """``sr`` naming the reports it supersedes, so viewers show only the current one.

    PS3.3 C.17.2 (SR Document General Module): Predecessor Documents Sequence (0040,A360), items
    by the Hierarchical SOP Instance Reference Macro (Table C.17-3): study, then series, then SOP.
    """
    if not previous:
        return sr
    items = []
    for study_uid in sorted({p.study_instance_uid for p in previous}):
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        in_study = [p for p in previous if p.study_instance_uid == study_uid]
        for series_uid in sorted({p.series_instance_uid for p in in_study}):
            series = Dataset()
            series.SeriesInstanceUID = series_uid
            series.ReferencedSOPSequence = []
            for p in sorted(in_study, key=lambda p: p.sop_instance_uid):
                if p.series_instance_uid == series_uid:
                    sop = Dataset()
                    sop.ReferencedSOPClassUID = p.sop_class_uid
                    sop.ReferencedSOPInstanceUID = p.sop_instance_uid
                    series.ReferencedSOPSequence.append(sop)
            study.ReferencedSeriesSequence.append(series)
        items.append(study)
    sr.PredecessorDocumentsSequence = items
    return sr
