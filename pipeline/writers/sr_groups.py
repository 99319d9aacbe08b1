"""The content of a TID 1500 report (``sr.write_sr``): lesion and classification groups, the lesions'
centroids, and the document-level qualitative evaluations (the triage priority).

- A lesion: TID 1411 Volumetric ROI group (TID 1501 when it has neither segment nor centroid) with
  TID 4108 tracking, finding category / type / site, TID 4019 of the segmentation model, TID 1419
  measurements (voxel volume, method 126030; probability-sum volume, local method; longest
  diameter) and its region: the SEG segment, else its centroid as a SCOORD3D POINT.
- A class: TID 1501 group with the class's coded subject (``Finding``), TID 4019 of the model that
  produced it and its probability.
- The triage priority: a CODE in TID 1500's "Qualitative Evaluations" container.
"""

from __future__ import annotations

from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence

from pipeline import codes
from pipeline.findings import AlgorithmInfo, Classification, Finding, Findings
from pipeline.uids import finding_tracking_uid, tracking_uid
from pipeline.volume import InstanceRef, Volume
from pipeline.writers.output import significant

__all__ = [
    "IMAGING_MEASUREMENTS",
    "MEASUREMENT_DIGITS",
    "PROBABILITY_DIGITS",
    "add_centroids",
    "algorithm_identification",
    "classification_group",
    "concept_of",
    "finding_group",
    "placeholder_group",
    "qualitative_evaluations",
]

IMAGING_MEASUREMENTS = ("126010", "DCM")  # TID 1500 "Imaging Measurements" container
MEASUREMENT_DIGITS = 3  # significant digits of volumes and diameters
PROBABILITY_DIGITS = 2


def placeholder_group() -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """What highdicom insists on when nothing was measured; removed again before the SR is built."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid="2.25.0", identifier="none")
    )


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
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


def finding_group(
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
        "algorithm_id": algorithm_identification(algorithm),
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


def add_centroids(root: Dataset, findings: Findings, volume: Volume) -> None:
    """With a SEG, a lesion group's ROI is its segment (TID 1411 allows one ROI); add its centroid.

    The point follows the group's measurements as a SCOORD3D POINT named "Center of Mass" (CID 219)
    in the volume's frame of reference; groups that already hold a SCOORD3D are left alone.
    """
    measurements = next(
        (item for item in root.ContentSequence if concept_of(item) == IMAGING_MEASUREMENTS), None
    )
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


def concept_of(item: Dataset) -> tuple[str, str] | None:
    """(CodeValue, CodingSchemeDesignator) of a content item's concept name, if it has one."""
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


def classification_group(
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
        algorithm_id=algorithm_identification(algorithm),
        measurements=[
            hd.sr.Measurement(
                name=codes.coded(codes.PROBABILITY),
                value=significant(classification.probability, PROBABILITY_DIGITS),
                unit=codes.coded(codes.UNIT_NONE),
            )
        ],
    )


def qualitative_evaluations(findings: Findings) -> hd.sr.ContainerContentItem:
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
