"""A detection bundle's boxes in the TID 1500 report (``sr.write_sr``): one TID 1411 group per box.

Each group holds:

- TID 4108 tracking identifier (``"nodule box 1"``) and a Tracking UID derived from the input
  fingerprint, the model and the box's class and number (so a re-run is a duplicate);
- finding category / type / site from the class name (:mod:`pipeline.labels`; a local code naming the
  class when the table does not know it), TID 4019 of the detection model;
- the region, TID 1411 "Volume surface" (121231, DCM): a SCOORD3D **ELLIPSOID** in the volume's frame of
  reference, the ellipsoid inscribed in the box: its three axes run along the patient's L, P and S
  axes and end at the centres of the box's faces, so the box is exactly the ellipsoid's bounding box.
  SCOORD3D has no box or polyhedron graphic type (PS3.3 C.18.9.1.2: POINT, MULTIPOINT, POLYLINE,
  POLYGON, ELLIPSE, ELLIPSOID), and TID 1411 takes a volume surface as one ELLIPSOID or a stack of
  planar POLYGON/ELLIPSE regions; the ellipsoid is one item that carries all six box coordinates.
  Its source is the whole series (Referenced Series for segmentation), since a box spans slices;
- TID 1419 measurements: the detector's score as NUM "Probability" (122157, DCM; UCUM ``1``), and the
  box's extent along each patient axis, NUM (110860, DCM, "Left-Right Axis"), (110862, DCM,
  "Anterior-Posterior Axis") and (110861, DCM, "Head-Foot Axis") in mm (UCUM ``mm``).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np

from pipeline import codes
from pipeline.findings import AlgorithmInfo, Detection
from pipeline.uids import tracking_uid
from pipeline.volume import Volume
from pipeline.writers.output import significant
from pipeline.writers.sr_groups import MEASUREMENT_DIGITS, PROBABILITY_DIGITS, algorithm_identification

__all__ = ["box_ellipsoid", "box_group", "box_type", "box_uid"]


def box_uid(input_fingerprint: str, algorithm: AlgorithmInfo, box: Detection) -> str:
    """The Tracking UID of ``box`` (TID 4108), the same on every run of the same input."""
    return tracking_uid(input_fingerprint, algorithm, "detection", box.name, str(box.index))


def box_type(box: Detection) -> hd.sr.CodedConcept:
    """The box's coded finding type, or a local code naming its class."""
    if box.type is not None:
        return codes.coded(box.type)
    value = f"LABEL-{box.label}"[:16]
    return hd.sr.CodedConcept(value, codes.PRIVATE_SCHEME, box.name[:64] or value)


def box_ellipsoid(box: Detection) -> np.ndarray:
    """The 6 x 3 ELLIPSOID graphic data of the ellipsoid inscribed in ``box`` (LPS mm).

    Rows: the two ends of the left-right axis, then anterior-posterior, then head-foot (PS3.3
    C.18.9.1.2: three pairs, each the endpoints of one axis).
    """
    centre = np.asarray(box.centre_lps, dtype=float)
    half = np.asarray(box.size_mm, dtype=float) / 2
    points = []
    for axis in range(3):
        step = np.zeros(3)
        step[axis] = half[axis]
        points += [centre - step, centre + step]
    return np.asarray(points)


def box_group(
    box: Detection, volume: Volume, input_fingerprint: str, algorithm: AlgorithmInfo
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one box (module docstring)."""
    size = box.size_mm
    measurements = [
        hd.sr.Measurement(
            name=codes.coded(codes.PROBABILITY),
            value=significant(box.score, PROBABILITY_DIGITS),
            unit=codes.coded(codes.UNIT_NONE),
        ),
        *(
            hd.sr.Measurement(
                name=codes.coded(axis),
                value=significant(extent, MEASUREMENT_DIGITS),
                unit=codes.coded(codes.UNIT_MM),
            )
            for axis, extent in zip(codes.BOX_AXES, size, strict=True)
        ),
    ]
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
        graphic_data=box_ellipsoid(box),
        frame_of_reference_uid=volume.frame_of_reference_uid,
        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=box_uid(input_fingerprint, algorithm, box), identifier=box.tracking_identifier
        ),
        referenced_volume_surface=surface,
        finding_type=box_type(box),
        finding_category=codes.coded(box.category) if box.category is not None else None,
        finding_sites=(
            [hd.sr.FindingSite(anatomic_location=codes.coded(box.finding_site))]
            if box.finding_site is not None
            else None
        ),
        algorithm_id=algorithm_identification(algorithm),
        measurements=measurements,
    )
