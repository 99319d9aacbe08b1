"""A lesion map -> a binary DICOM Segmentation on the source geometry (PS3.3 A.51, C.8.20).

One segment per lesion (finding) that has voxels, numbered 1..n in findings order; the lesion map's
value ``n`` is ``findings.findings[n - 1]`` (``pipeline.measure.measure_lesions``). Each segment
carries the finding's SNOMED CT category and type (CID 7150 / CID 7151; a local ``99PTRIAGE``
code when the label map gives none), its finding site as Anatomic Region, the algorithm
identification (Segment Algorithm Type AUTOMATIC, PS3.3 C.8.20.2: name, version, family CID 7162,
the bundle sha256 as a parameter) and the same Tracking ID and UID as the lesion's SR measurement
group. The segmentation model is a Contributing Equipment item (IHE AIR, ``output.finalize_output``).

Geometry: frame ``k`` of the SEG is slice ``k`` of the volume and derives from
``source_datasets[k]``; highdicom takes each frame's position and orientation from that source
image, so the SEG lies exactly on the source grid (tilted or unevenly spaced included). The
volume is indexed ``[i=column, j=row, k=slice]`` and a frame is ``[row, column]``, hence the
transpose ``[i, j, k] -> [k, j, i]``. Empty frames are omitted.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from pipeline import codes
from pipeline.findings import AlgorithmInfo, Finding, Findings
from pipeline.uids import (
    DEVICE_OBSERVER_UID,
    MANUFACTURER,
    PRODUCT_NAME,
    SOFTWARE_VERSION,
    ResultSeries,
    derive_uid,
    finding_tracking_uid,
    result_uids,
)
from pipeline.volume import Volume
from pipeline.writers.output import OUTPUT_CHARACTER_SET, finalize_output, header_copies

SEG_SERIES_NUMBER = int(ResultSeries.SEG)
CONTENT_LABEL = "PACS_TRIAGE"  # CS: upper case, digits, underscore (PS3.5 6.2)


def write_seg(
    label_volume: np.ndarray,
    volume: Volume,
    source_datasets: Sequence[Dataset],
    findings: Findings,
    *,
    input_fingerprint: str,
    content_datetime: datetime.datetime,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
    series_description: str = "AI triage segmentation",
    manufacturer: str = MANUFACTURER,
    product_name: str = PRODUCT_NAME,
    software_version: str = SOFTWARE_VERSION,
    device_serial_number: str = DEVICE_OBSERVER_UID,
) -> Dataset:
    """Build the binary SEG of the lesion map ``label_volume`` (value n: ``findings.findings[n - 1]``).

    A multi-label lesion map is ``[C, i, j, k]`` (:func:`pipeline.measure.measure_overlapping`): its
    segments may overlap, and the SEG carries them so (one frame per slice and segment).

    ``label_volume`` is ``[i, j, k]`` on ``volume``'s grid; ``source_datasets`` are the headers of
    the single-frame source images in volume order. ``content_datetime`` is when the analysis began
    (Content and Instance Creation Date/Time). Raises ``ValueError`` when the inputs do not
    line up, or when no finding has a voxel (there is then nothing to segment: write no SEG).
    """
    _check_inputs(label_volume, volume, source_datasets)
    segmented = _segmented_findings(label_volume, findings)
    if not segmented:
        raise ValueError(
            f"no finding of {findings.algorithm.name} has a voxel in the label volume of series "
            f"{volume.series_instance_uid}: there is nothing to segment, write no SEG"
        )

    if label_volume.ndim == 4:  # multi-label: [C, i, j, k] layers whose segments may overlap
        stacked = np.stack([(label_volume == value).any(axis=0) for value, _ in segmented], axis=-1)
        frames = np.ascontiguousarray(np.transpose(stacked, (2, 1, 0, 3)))  # (frame, row, col, segment)
    else:
        frames_ijk = np.zeros(label_volume.shape, dtype=np.uint8 if len(segmented) < 256 else np.uint16)
        for number, (value, _) in enumerate(segmented, start=1):
            frames_ijk[label_volume == value] = number
        frames = np.ascontiguousarray(np.transpose(frames_ijk, (2, 1, 0)))  # [k, j, i] = (frame, row, col)

    algorithm = findings.algorithm
    descriptions = [
        _segment_description(number, finding, input_fingerprint, algorithm)
        for number, (_, finding) in enumerate(segmented, start=1)
    ]
    coded_items = [c for _, f in segmented for c in (codes.finding_category(f), codes.finding_type(f))]
    headers = header_copies(source_datasets)
    uids = result_uids(input_fingerprint, algorithm, "seg")
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=product_name,
        software_versions=software_version,
        device_serial_number=device_serial_number,
        omit_empty_frames=True,
        content_label=CONTENT_LABEL,
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        series_description=series_description,
        specific_character_set=OUTPUT_CHARACTER_SET,  # finalize_output drops it if all is ASCII
        coding_schemes=(
            [codes.private_scheme_identification()] if codes.uses_private_scheme(coded_items) else None
        ),
    )
    # highdicom draws a random Dimension Organization UID; ours follows from the result's UIDs.
    dimension_uid = derive_uid(uids.sop_instance_uid, "dimension-organization")
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    _segment_identification_per_frame(seg)
    finalize_output(seg, content_datetime, [algorithm])
    return seg


def _check_inputs(label_volume: np.ndarray, volume: Volume, source_datasets: Sequence[Dataset]) -> None:
    if label_volume.shape[-3:] != volume.array.shape or label_volume.ndim not in (3, 4):
        raise ValueError(
            f"label volume shape {label_volume.shape} differs from the volume's {volume.array.shape} "
            f"(series {volume.series_instance_uid}); the SEG must be on the source grid"
        )
    if not np.issubdtype(label_volume.dtype, np.integer) and label_volume.dtype != np.bool_:
        raise ValueError(f"label volume must hold integer labels, got dtype {label_volume.dtype}")
    if len(source_datasets) != len(volume.source_instances):
        raise ValueError(
            f"{len(source_datasets)} source datasets for {len(volume.source_instances)} slices of series "
            f"{volume.series_instance_uid}; write_seg needs one single-frame source image per slice"
        )
    n_columns, n_rows = label_volume.shape[-3], label_volume.shape[-2]
    for k, (ds, ref) in enumerate(zip(source_datasets, volume.source_instances, strict=True)):
        if ref.frame_number is not None:
            raise ValueError(
                f"slice {k} comes from frame {ref.frame_number} of multi-frame {ref.sop_instance_uid}; "
                "write_seg supports single-frame sources only"
            )
        if ds.SOPInstanceUID != ref.sop_instance_uid:
            raise ValueError(
                f"source dataset {k} is {ds.SOPInstanceUID} but slice {k} of the volume comes from "
                f"{ref.sop_instance_uid}: pass the source datasets in volume order"
            )
        if (int(ds.Rows), int(ds.Columns)) != (n_rows, n_columns):
            raise ValueError(
                f"source {ds.SOPInstanceUID} is {ds.Rows} rows x {ds.Columns} columns, the label volume "
                f"slice {n_rows} rows (j) x {n_columns} columns (i)"
            )


def _segmented_findings(label_volume: np.ndarray, findings: Findings) -> list[tuple[int, Finding]]:
    """(lesion map value, finding) of the findings that have at least one voxel, in findings order."""
    keys = [f.tracking_identifier for f in findings.findings]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"findings {duplicates} are not distinct lesions (same label and lesion number)")
    if int(label_volume.max(initial=0)) > len(findings.findings):
        raise ValueError(
            f"lesion map value {int(label_volume.max())} has no finding; there are {len(findings.findings)}"
        )
    present = set(np.unique(label_volume).tolist())
    return [(n, f) for n, f in enumerate(findings.findings, start=1) if n in present]


def _segment_description(
    number: int, finding: Finding, input_fingerprint: str, algorithm: AlgorithmInfo
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=finding.tracking_identifier[:64],
        segmented_property_category=codes.finding_category(finding),
        segmented_property_type=codes.finding_type(finding),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=codes.coded(codes.ALGORITHM_FAMILY),
            version=algorithm.version,
            parameters={"sha256": algorithm.sha256, "pipeline": algorithm.pipeline},
        ),
        tracking_uid=finding_tracking_uid(input_fingerprint, algorithm, finding),
        tracking_id=finding.tracking_identifier[:64],
        anatomic_regions=[codes.coded(finding.finding_site)] if finding.finding_site is not None else None,
    )


def _segment_identification_per_frame(seg: Dataset) -> None:
    """Keep Segment Identification per frame even when there is one segment.

    highdicom puts it in the shared functional groups for a single segment; both layouts are valid
    (PS3.3 C.8.20.2), but readers that follow segment references by frame (highdicom's own
    ReferencedSegment.from_segmentation, our SR writer) look per frame only.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" not in shared:
        return
    identification = shared.SegmentIdentificationSequence
    del shared.SegmentIdentificationSequence
    for frame in seg.PerFrameFunctionalGroupsSequence:
        frame.SegmentIdentificationSequence = copy.deepcopy(identification)
