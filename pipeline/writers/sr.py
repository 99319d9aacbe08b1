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
        per box        TID 1411 group of a detection bundle's box (``sr_boxes``): the box as the
                       SCOORD3D ELLIPSOID inscribed in it, NUM Probability (its score), NUM extent
                       along the L-R, A-P and H-F axes (mm)
      Qualitative Evaluations (C0034375, UMLS): CODE Priority = Routine / Urgent / Stat (SNOMED CT)
      TEXT (121111, DCM, "Summary"): findings.summary, for viewers that only render text (a row
                       added to TID 1500, which is an extensible template)

The groups and the document-level evaluation are built in ``sr_groups``. Numbers carry the
precision they have: volumes and diameters three significant digits, probabilities two. Content
Date/Time and Instance Creation Date/Time are the analysis time the caller passes in (IHE AIR); UIDs never depend on it. Every model behind the report is a
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

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from pipeline import codes
from pipeline.findings import Findings
from pipeline.uids import (
    DEVICE_OBSERVER_UID,
    MANUFACTURER,
    PRODUCT_NAME,
    SOFTWARE_VERSION,
    ResultSeries,
    result_uids,
)
from pipeline.volume import Volume
from pipeline.writers.image_library import insert_image_library
from pipeline.writers.output import (
    OUTPUT_CHARACTER_SET,
    finalize_output,
    header_copies,
    ihe_scheme_identification,
)
from pipeline.writers.sr_boxes import box_group, box_type
from pipeline.writers.sr_groups import (
    IMAGING_MEASUREMENTS,
    add_centroids,
    classification_group,
    concept_of,
    finding_group,
    placeholder_group,
    qualitative_evaluations,
)

SR_SERIES_NUMBER = int(ResultSeries.SR)


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
    ] = [finding_group(f, volume, seg, input_fingerprint, findings.algorithm) for f in findings.findings]
    groups += [classification_group(c, input_fingerprint, findings) for c in findings.classifications]
    groups += [box_group(b, volume, input_fingerprint, findings.algorithm) for b in findings.detections]

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
        imaging_measurements=groups or [placeholder_group()],
        title=codes.coded(codes.IMAGING_MEASUREMENT_REPORT),
    )
    insert_image_library(report[0], headers)
    if not groups:  # TID 1500 needs Imaging Measurements OR Qualitative Evaluations; highdicom the former
        report[0].ContentSequence = [
            item for item in report[0].ContentSequence if concept_of(item) != IMAGING_MEASUREMENTS
        ]
    add_centroids(report[0], findings, volume)
    report[0].ContentSequence.append(qualitative_evaluations(findings))
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
        *(box_type(b) for b in findings.detections),
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
