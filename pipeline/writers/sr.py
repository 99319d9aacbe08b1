"""Findings -> a Comprehensive 3D SR (PS3.3 A.35.13) holding a PS3.16 TID 1500 Measurement Report.

Document tree (one row per content item kind; template ids from PS3.16):

    CONTAINER (126000, DCM, "Imaging Measurement Report")             TID 1500
      language, observation context: device observer (TID 1002/1004)
      "Procedure reported": CID 100 code for the series' Modality
      Image Library (TID 1600): one IMAGE entry per source image; modality and frame of reference
                       once per group (entry descriptors are optional: pipeline.writers.image_library)
      Imaging Measurements
        per lesion     TID 1411 Volumetric ROI group: tracking identifier ("lesion 1") and UID
                       (TID 4108, shared with its SEG segment), finding category / type / site,
                       TID 4019 algorithm identification of the segmentation model (name, version,
                       sha256 parameter), ROI = the SEG segment (Referenced Segment) when a SEG was
                       written, else the centroid as a SCOORD3D POINT with geometric purpose "Center
                       of Mass" (CID 219); NUM Volume (ml, method 126030: the voxels the SEG shows),
                       NUM Volume (ml, method "sum of voxel probabilities", when known), NUM
                       Diameter (mm, derivation Maximum); with a SEG, the centroid follows as a
                       SCOORD3D POINT "Center of Mass" in the frame of reference
        per class      TID 1501 group: Finding = what the class is about (coded), TID 4019 of the
                       classification model, NUM Probability (UCUM "1")
      Qualitative Evaluations (C0034375, UMLS): CODE Priority = Routine / Urgent / Stat (SNOMED CT)
      TEXT (121111, DCM, "Summary"): findings.summary, for viewers that only render text (a row
                       added to TID 1500, which is an extensible template)

Numbers carry the precision they have: volumes and diameters three significant digits,
probabilities two. Content Date/Time and Instance Creation Date/Time are the analysis time the
caller passes in (IHE AIR); UIDs never depend on it. Every model behind the report is a
Contributing Equipment item (IHE AIR "Processing Algorithm", ``output.finalize_output``).

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
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.uid import SegmentationStorage

from pipeline import codes
from pipeline.findings import AlgorithmInfo, Classification, Finding, Findings
from pipeline.uids import (
    DEVICE_OBSERVER_UID,
    MANUFACTURER,
    PRODUCT_NAME,
    SOFTWARE_VERSION,
    ResultSeries,
    finding_tracking_uid,
    result_uids,
    tracking_uid,
)
from pipeline.volume import InstanceRef, Volume
from pipeline.writers.image_library import insert_image_library
from pipeline.writers.output import (
    OUTPUT_CHARACTER_SET,
    finalize_output,
    header_copies,
    ihe_scheme_identification,
    significant,
)

SR_SERIES_NUMBER = int(ResultSeries.SR)
MEASUREMENT_DIGITS = 3  # significant digits of volumes and diameters
PROBABILITY_DIGITS = 2


def write_sr(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    volume: Volume,
    *,
    input_fingerprint: str,
    content_datetime: datetime.datetime,
    seg: Dataset | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str = "AI triage findings",
    manufacturer: str = MANUFACTURER,
    product_name: str = PRODUCT_NAME,
    software_version: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR for ``findings`` on ``volume``.

    ``source_datasets`` are the headers of the selected series' instances in volume order (pixel
    data is not needed). ``seg`` is the SEG from ``write_seg`` for the same findings, if one was
    made: each lesion's group then references its segment. ``content_datetime`` is when the
    analysis began (the caller owns the clock): Content/Instance Creation Date and Time. UIDs never
    depend on it.
    """
    headers = _source_headers(source_datasets, volume)
    if seg is not None:
        _check_seg(seg, volume)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [_finding_group(f, volume, seg, input_fingerprint, findings.algorithm) for f in findings.findings]
    groups += [_classification_group(c, input_fingerprint, findings) for c in findings.classifications]

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
        imaging_measurements=groups or [_placeholder_group()],
        title=codes.coded(codes.IMAGING_MEASUREMENT_REPORT),
    )
    insert_image_library(report[0], headers)
    if not groups:  # TID 1500 needs Imaging Measurements OR Qualitative Evaluations; highdicom the former
        report[0].ContentSequence = [
            item for item in report[0].ContentSequence if _concept(item) != ("126010", "DCM")
        ]
    _add_centroids(report[0], findings, volume)
    report[0].ContentSequence.append(_qualitative_evaluations(findings))
    if findings.summary:
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.coded(codes.SUMMARY),
                value=findings.summary,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )

    uids = result_uids(input_fingerprint, findings.algorithm, "sr")
    evidence: list[Dataset] = [*headers, seg] if seg is not None else headers
    coded_items = [
        *(codes.finding_type(f) for f in findings.findings if f.type is None),
        *(codes.classification_subject(c.name) for c in findings.classifications),
        *([codes.coded(codes.VOLUME_METHOD_PROBABILITY_SUM)] if _has_probability_volumes(findings) else []),
    ]
    schemes = [ihe_scheme_identification()]
    if codes.uses_private_scheme(coded_items):
        schemes.insert(0, codes.private_scheme_identification())
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
        coding_schemes=schemes,
    )
    finalize_output(sr, content_datetime, findings.algorithms)
    return sr


def _placeholder_group() -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """What highdicom insists on when nothing was measured; removed again before the SR is built."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid="2.25.0", identifier="none")
    )


def _has_probability_volumes(findings: Findings) -> bool:
    return any(f.probability_volume_ml is not None for f in findings.findings)


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
    """TID 4019: model name, version, and the sha256 it is pinned by as a parameter (no family)."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"sha256={algorithm.sha256}", f"pipeline={algorithm.pipeline}"],
    )


class _GroupArgs(TypedDict):
    """The arguments a lesion's group takes whatever its ROI reference (TID 1411 / TID 1501)."""

    tracking_identifier: hd.sr.TrackingIdentifier
    finding_type: hd.sr.CodedConcept | None
    finding_category: hd.sr.CodedConcept | None
    finding_sites: list[hd.sr.FindingSite] | None
    algorithm_id: hd.sr.AlgorithmIdentification
    measurements: list[hd.sr.Measurement]


def _measurements(finding: Finding) -> list[hd.sr.Measurement]:
    """TID 1419 rows: the voxel volume (method coded), the probability-sum volume, the diameter."""
    out = [
        hd.sr.Measurement(
            name=codes.coded(codes.VOLUME),
            value=significant(finding.volume_ml, MEASUREMENT_DIGITS),
            unit=codes.coded(codes.UNIT_ML),
            method=codes.coded(codes.VOLUME_METHOD),
        )
    ]
    if finding.probability_volume_ml is not None:
        out.append(
            hd.sr.Measurement(
                name=codes.coded(codes.VOLUME),
                value=significant(finding.probability_volume_ml, MEASUREMENT_DIGITS),
                unit=codes.coded(codes.UNIT_ML),
                method=codes.coded(codes.VOLUME_METHOD_PROBABILITY_SUM),
            )
        )
    out.append(
        hd.sr.Measurement(
            name=codes.coded(codes.DIAMETER),
            value=significant(finding.largest_diameter_mm, MEASUREMENT_DIGITS),
            unit=codes.coded(codes.UNIT_MM),
            derivation=codes.coded(codes.MAXIMUM),
        )
    )
    return out


def _finding_group(
    finding: Finding,
    volume: Volume,
    seg: Dataset | None,
    input_fingerprint: str,
    algorithm: AlgorithmInfo,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one lesion (TID 1501 when it has neither segment nor centroid)."""
    uid = finding_tracking_uid(input_fingerprint, algorithm, finding)
    common: _GroupArgs = {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=uid, identifier=finding.tracking_identifier),
        "finding_type": codes.coded(finding.type) if finding.type is not None else None,
        "finding_category": codes.coded(finding.category) if finding.category is not None else None,
        "finding_sites": (
            [hd.sr.FindingSite(anatomic_location=codes.coded(finding.finding_site))]
            if finding.finding_site is not None
            else None
        ),
        "algorithm_id": _algorithm_identification(algorithm),
        "measurements": _measurements(finding),
    }
    segment_number = _segment_number(seg, uid) if seg is not None else None
    if seg is not None and segment_number is not None:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number),
            **common,
        )
    surface = _centroid_surface(finding, volume)
    if surface is not None:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_volume_surface=surface,
            geometric_purpose=codes.coded(codes.CENTER_OF_MASS),
            **common,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(**common)


def _centroid_surface(finding: Finding, volume: Volume) -> hd.sr.VolumeSurface | None:
    """The lesion's centroid as a SCOORD3D POINT in the frame of reference, if it has one."""
    centroid = np.asarray(finding.centroid_lps, dtype=float)
    if finding.volume_ml <= 0 or not np.all(np.isfinite(centroid)):
        return None
    return hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=centroid.reshape(1, 3),
        frame_of_reference_uid=volume.frame_of_reference_uid,
        source_images=[_source_image(_slice_of(volume, centroid))],
    )


def _add_centroids(root: Dataset, findings: Findings, volume: Volume) -> None:
    """With a SEG, a lesion group's ROI is its segment (TID 1411 allows one ROI); add its centroid.

    The point follows the group's measurements as a SCOORD3D POINT named "Center of Mass" (CID 219)
    in the volume's frame of reference; groups that already hold a SCOORD3D are left alone.
    """
    measurements = next((item for item in root.ContentSequence if _concept(item) == ("126010", "DCM")), None)
    if measurements is None:
        return
    for group, finding in zip(measurements.ContentSequence, findings.findings, strict=False):
        if any(item.ValueType == "SCOORD3D" for item in group.ContentSequence):
            continue
        surface = _centroid_surface(finding, volume)
        if surface is None:
            continue
        point = hd.sr.Scoord3DContentItem(
            name=codes.coded(codes.CENTER_OF_MASS),
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray(finding.centroid_lps, dtype=float).reshape(1, 3),
            frame_of_reference_uid=volume.frame_of_reference_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        group.ContentSequence.append(point)


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else None


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
    classification: Classification, input_fingerprint: str, findings: Findings
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the probability that ``classification.name`` is present, by the model that said so."""
    algorithm = findings.algorithm_of(classification)
    uid = tracking_uid(input_fingerprint, algorithm, "classification", classification.name)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid, identifier=f"{classification.name} (classification)"
        ),
        finding_type=codes.classification_subject(classification.name),
        algorithm_id=_algorithm_identification(algorithm),
        measurements=[
            hd.sr.Measurement(
                name=codes.coded(codes.PROBABILITY),
                value=significant(classification.probability, PROBABILITY_DIGITS),
                unit=codes.coded(codes.UNIT_NONE),
            )
        ],
    )


def _qualitative_evaluations(findings: Findings) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": the study's triage priority, a coded document-level evaluation."""
    container = hd.sr.ContainerContentItem(
        name=codes.coded(codes.QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = PydicomSequence(
        [
            hd.sr.CodeContentItem(
                name=codes.coded(codes.PRIORITY),
                value=codes.coded(codes.PRIORITY_VALUES[findings.priority]),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


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
