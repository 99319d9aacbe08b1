"""Real validators for the objects the writers produce, and the real inputs they are built from.

``dciodvfy`` (dicom3tools) checks an object against its IOD; ``dsrdump`` (dcmtk) parses an SR
content tree. Neither checks template content: ``tid1500_checks`` does that. A missing tool fails
the test (these are ``peer`` tests, DESIGN.md "Testing"), it never skips it.

dciodvfy writes its report to stderr, one message per line, ``Error - ...`` / ``Warning - ...``;
dcmtk tools log ``E: ...`` / ``W: ...``. Both forms are read for both tools. Any error fails;
warnings are printed so they show in the test log (``pytest -s``, or on failure).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pipeline.findings import AlgorithmInfo, Classification, Code, Finding, Findings
from pipeline.volume import InstanceRef, Volume
from vocabulary import Priority

_ERROR_PREFIXES = ("Error", "E:")
_WARNING_PREFIXES = ("Warning", "W:")


@dataclass(frozen=True)
class ValidatorReport:
    """What one validator run said about one object."""

    tool: str
    returncode: int
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str


def require_tool(name: str) -> str:
    """Path of a validator on PATH; fail (not skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: install Debian packages dicom3tools (dciodvfy) and dcmtk (dsrdump)"
        )
    return path


def encode(ds: Dataset) -> bytes:
    """The object as a DICOM Part 10 file in memory."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def roundtrip(ds: Dataset) -> Dataset:
    """Encode to bytes and decode again: what a peer receiving the object would read."""
    return pydicom.dcmread(io.BytesIO(encode(ds)))


def _run(tool: str, ds: Dataset) -> ValidatorReport:
    executable = require_tool(tool)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object.dcm"
        path.write_bytes(encode(ds))
        done = subprocess.run([executable, str(path)], capture_output=True, timeout=120, check=False)
    output = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    lines = [line.strip() for line in output.splitlines()]
    return ValidatorReport(
        tool=tool,
        returncode=done.returncode,
        errors=tuple(line for line in lines if line.startswith(_ERROR_PREFIXES)),
        warnings=tuple(line for line in lines if line.startswith(_WARNING_PREFIXES)),
        output=output,
    )


def assert_dciodvfy_clean(ds: Dataset, label: str = "") -> ValidatorReport:
    """Run dciodvfy on ``ds``: no error allowed, warnings printed."""
    report = _run("dciodvfy", ds)
    for warning in report.warnings:
        print(f"dciodvfy {label}: {warning}")
    assert not report.errors, f"dciodvfy {label} reported errors:\n" + "\n".join(report.errors)
    return report


def assert_dsrdump_ok(ds: Dataset, label: str = "") -> ValidatorReport:
    """Run dsrdump on an SR: exit status 0 and no error lines; warnings printed."""
    report = _run("dsrdump", ds)
    for warning in report.warnings:
        print(f"dsrdump {label}: {warning}")
    assert report.returncode == 0, f"dsrdump {label} exited {report.returncode}:\n{report.output[-2000:]}"
    assert not report.errors, f"dsrdump {label} reported errors:\n" + "\n".join(report.errors)
    return report


def dsr2xml(ds: Dataset) -> ET.Element:
    """The SR as dcmtk's ``dsr2xml`` reads it (codes, relationship and value type as attributes).

    Items are ``<item valType=.. relType=..>`` with ``<concept codValue=.. codScheme=..>`` and a
    ``<value>``; the header carries ``<instance><creation><date>/<time>``.
    """
    executable = require_tool("dsr2xml")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object.dcm"
        path.write_bytes(encode(ds))
        done = subprocess.run(
            [executable, "+Ec", "+Er", "+Ev", str(path)], capture_output=True, timeout=120, check=False
        )
    assert done.returncode == 0, f"dsr2xml exited {done.returncode}: {done.stderr.decode(errors='replace')}"
    return ET.fromstring(done.stdout)


# --- real inputs -------------------------------------------------------------------------------------


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """Headers (no pixel data) of single-frame images, sorted along the slice normal."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    normal = _normal(headers[0])
    return sorted(headers, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def volume_from_headers(headers: Sequence[Dataset], array: np.ndarray | None = None) -> Volume:
    """A small Volume on the headers' grid (test stand-in for the geometry loader).

    Columns 0 and 1 of the affine are the row / column direction cosines times PixelSpacing[1] /
    PixelSpacing[0] (PS3.3 C.7.6.2.1.1); column 2 is the step between the first two slice
    positions, so a gantry tilt shows as a shear.
    """
    first = headers[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    step = (
        np.asarray(headers[1].ImagePositionPatient, dtype=float) - origin
        if len(headers) > 1
        else _normal(first)
    )
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * column_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = origin
    if array is None:
        array = np.zeros((int(first.Columns), int(first.Rows), len(headers)), dtype=np.int16)
    return Volume(
        array=array,
        affine=affine,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        modality=str(first.Modality),
        source_instances=tuple(InstanceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in headers),
    )


# --- synthetic findings on a real grid -----------------------------------------------------------

ALGORITHM = AlgorithmInfo(name="demo_ct_seg", version="0.3.1", sha256="5" * 64, pipeline="ct-abdomen")
CLASSIFIER = AlgorithmInfo(name="demo_ct_cls", version="0.2.0", sha256="6" * 64, pipeline="ct-abdomen")
SPLEEN = (Code("91723000", "SCT", "Anatomical Structure"), Code("78961009", "SCT", "Spleen"))
LESION = (Code("49755003", "SCT", "Morphologically Abnormal Structure"), Code("52988006", "SCT", "Lesion"))
LIVER = Code("10200004", "SCT", "Liver")


def synthetic_case(volume: Volume, *, coded: bool = True) -> tuple[np.ndarray, Findings]:
    """A label volume [i, j, k] with two asymmetric blobs, and the Findings measured from it.

    Label 1 ("spleen") is an L-shaped block over several slices, label 2 ("lesion", site liver) a
    small block in one slice, so any transpose or flip of the grid changes the masks. Each is one
    lesion, so the label value is also the finding's position (a lesion map). Volumes and
    centroids are computed from the labels (as ``measure.py`` would), so SR and SEG agree.
    """
    n_i, n_j, n_k = volume.array.shape
    labels = np.zeros((n_i, n_j, n_k), dtype=np.uint8)
    k_mid = n_k // 2
    i0, j0 = n_i // 3, n_j // 2
    labels[i0 : i0 + n_i // 8, j0 : j0 + n_j // 16, max(0, k_mid - 1) : k_mid + 2] = 1
    labels[i0 : i0 + n_i // 32, j0 : j0 + n_j // 6, k_mid] = 1  # the foot of the L, along j
    labels[n_i // 8 : n_i // 8 + 4, n_j // 5 : n_j // 5 + 7, n_k - 1] = 2
    findings = []
    for label, name, codes, site in ((1, "spleen", SPLEEN, None), (2, "lesion", LESION, LIVER)):
        ijk = np.argwhere(labels == label)
        centroid = volume.index_to_patient(ijk.mean(axis=0))[0]
        extent = volume.index_to_patient(ijk.max(axis=0)) - volume.index_to_patient(ijk.min(axis=0))
        findings.append(
            Finding(
                label=label,
                name=name,
                volume_ml=len(ijk) * volume.voxel_volume_ml,
                voxel_count=len(ijk),
                largest_diameter_mm=float(np.linalg.norm(extent)),
                centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                category=codes[0] if coded else None,
                type=codes[1] if coded else None,
                finding_site=site if coded else None,
            )
        )
    return labels, Findings(
        algorithm=ALGORITHM,
        findings=tuple(findings),
        classifications=(Classification("splenic injury", 0.87, CLASSIFIER),),
        priority=Priority.URGENT,
        summary="URGENT: spleen 123 mL; lesion in liver; splenic injury p=0.87",
    )
