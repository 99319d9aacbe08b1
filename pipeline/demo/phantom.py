"""Synthetic abdominal CT phantoms with lesions of known size: DICOM series and in-memory volumes.

A phantom is a pure function of its seed and options (no clock, no global RNG): anatomy, lesions and
noise come from three independent streams of ``numpy.random.default_rng((seed, stream))``, so the same
seed with ``lesions=0`` is the same body and noise without lesions (a paired control). UIDs come from
``pipeline.uids.derive_uid("phantom", seed, role)`` and dates derive from the seed.

The body (portal-venous contrast): subcutaneous fat, muscle wall, lung bases, liver (the host organ),
spleen, kidneys, aorta, IVC, spine with discs, and rib arcs. Lesions are rotated ellipsoids inside the
liver, hypodense by default, rendered with partial volume (supersampled coverage); the ground-truth
mask is "voxel centre inside the lesion". Geometry follows ``pipeline.volume``: array ``[i, j, k]``,
affine to LPS mm, axial slices with ImageOrientationPatient ``1\\0\\0\\0\\1\\0``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pipeline.demo.anatomy import ANATOMY_STREAM, TISSUE, Anatomy, Ellipsoid, body, random_rotation
from pipeline.uids import derive_uid
from pipeline.volume import InstanceRef, Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_ANATOMY, _LESIONS, _NOISE = ANATOMY_STREAM, 1, 2  # independent RNG streams per seed

HOST_ORGAN = "liver"


@dataclass(frozen=True, kw_only=True)
class PhantomOptions:
    """How a phantom is drawn; ranges are (low, high) and sampled per seed."""

    matrix: int = 512
    pixel_spacing_mm: float | None = None  # None: drawn from the seed in [0.70, 0.80]
    slice_thickness_mm: float = 2.5  # slices are contiguous: spacing equals thickness
    lesion_volume_ml: tuple[float, float] = (2.0, 30.0)  # log-uniform
    contrast_hu: tuple[float, float] = (40.0, 80.0)  # |lesion - liver|
    noise_sd_hu: tuple[float, float] = (10.0, 20.0)
    hyperdense: bool = False  # lesions brighter than the liver instead of darker

    def __post_init__(self) -> None:
        for name in ("lesion_volume_ml", "contrast_hu", "noise_sd_hu"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"PhantomOptions.{name} must be 0 <= low <= high, got {(low, high)}")
        if self.matrix < 64 or self.slice_thickness_mm <= 0:
            raise ValueError(f"PhantomOptions: matrix >= 64 and slice thickness > 0, got {self}")

    @classmethod
    def small_lesions(cls) -> PhantomOptions:
        """Lesions of 0.2-2 mL (radius ~3.6-7.8 mm)."""
        return cls(lesion_volume_ml=(0.2, 2.0))

    @classmethod
    def faint_lesions(cls) -> PhantomOptions:
        """Default sizes but only 15-40 HU of contrast."""
        return cls(contrast_hu=(15.0, 40.0))


@dataclass(frozen=True)
class Lesion:
    """One ellipsoidal lesion; ``label`` is its value in the ground-truth label map."""

    label: int
    centre_lps: tuple[float, float, float]  # mm
    semi_axes_mm: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]  # columns: the semi-axis directions (LPS)
    radius_mm: float  # radius of the sphere of the same volume
    volume_ml: float  # analytic, 4/3 pi abc
    voxel_count: int  # voxel centres inside, on the phantom's grid
    voxel_volume_ml: float  # voxel_count x voxel volume
    contrast_hu: float  # lesion minus host organ (negative: hypodense)


@dataclass(frozen=True)
class GroundTruth:
    """What a phantom contains, in patient (LPS) coordinates and on its voxel grid."""

    seed: int
    lesions: tuple[Lesion, ...]
    shape: tuple[int, int, int]  # [i, j, k] of the full series grid
    affine: tuple[tuple[float, ...], ...]  # (i, j, k, 1) -> LPS mm
    organ: str
    organ_centre_lps: tuple[float, float, float]  # the host organ's bounding ellipsoid, mm
    organ_semi_axes_mm: tuple[float, float, float]
    organ_hu: float
    noise_sd_hu: float
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    options: PhantomOptions = field(default_factory=PhantomOptions)

    def to_json(self) -> str:
        """The ground truth as indented JSON (``ground_truth.json``)."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> GroundTruth:
        """Inverse of :meth:`to_json`."""
        raw: dict[str, Any] = _tuples(json.loads(text))
        lesions = tuple(Lesion(**lesion) for lesion in raw.pop("lesions"))
        options = PhantomOptions(**raw.pop("options"))
        return cls(**raw, lesions=lesions, options=options)


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples, recursively (the dataclasses hold tuples)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def phantom_uid(seed: int, role: str) -> str:
    """A deterministic UID for one role ("study", "series", "sop/12", ...) of one seed."""
    return derive_uid("phantom", str(seed), role)


def _grid(seed: int, slices: int, options: PhantomOptions) -> np.ndarray:
    """Affine of the full axial grid: centred in x/y, slab centred on the body reference z."""
    rng = np.random.default_rng((seed, _ANATOMY, 1))
    ps = options.pixel_spacing_mm or round(float(rng.uniform(0.70, 0.80)), 4)
    dz, n = options.slice_thickness_mm, options.matrix
    zc = body(seed).zc
    origin = [round(c, 3) for c in (-(n - 1) / 2 * ps, -(n - 1) / 2 * ps, zc - (slices - 1) / 2 * dz)]
    affine = np.diag([ps, ps, dz, 1.0])
    affine[:3, 3] = origin
    return affine


def _axes(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if np.any(np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))) > 1e-6):
        raise ValueError("phantoms render only on axis-aligned grids")
    x, y, z = (affine[d, d] * np.arange(shape[d]) + affine[d, 3] for d in range(3))
    return x, y, z


def _lesion_box(lesion: Ellipsoid, affine: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index box (clipped to the grid) that holds the lesion."""
    step = np.diag(affine)[:3]
    centre = (lesion.centre - affine[:3, 3]) / step
    reach = (float(lesion.axes.max()) + 1e-3) / np.abs(step)
    lo = np.clip(np.floor(centre - reach) - 1, 0, shape).astype(int)
    hi = np.clip(np.ceil(centre + reach) + 2, lo, shape).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _coverage(lesion: Ellipsoid, affine: np.ndarray, shape: tuple[int, ...], centres: bool = False) -> tuple[tuple[slice, ...], np.ndarray]:  # fmt: skip
    """Bounding box and the fraction of each of its voxels inside the lesion (~0.35 mm supersampling);
    with ``centres``, whether each voxel centre is inside (the ground-truth mask)."""
    box = _lesion_box(lesion, affine, shape)
    x, y, z = (c[b] for c, b in zip(_axes(affine, shape), box, strict=True))
    if centres:
        return box, lesion.inside(x[:, None, None], y[None, :, None], z[None, None, :])
    n = [max(3, int(np.ceil(abs(affine[d, d]) / 0.35))) for d in range(3)]
    offs = [((np.arange(m) + 0.5) / m - 0.5) * affine[d, d] for d, m in enumerate(n)]
    frac = np.zeros((len(x), len(y), len(z)))
    for ox in offs[0]:
        for oy in offs[1]:
            zz = z[None, None, :, None] + offs[2]
            frac += lesion.inside(x[:, None, None, None] + ox, y[None, :, None, None] + oy, zz).mean(axis=-1)
    return box, frac / (n[0] * n[1])


def _place_lesions(
    seed: int, count: int, anatomy: Anatomy, z_range: tuple[float, float], options: PhantomOptions
) -> list[tuple[Ellipsoid, float]]:
    """Ellipsoids fully inside the liver (3 mm margin) and the imaged slab, apart from each other."""
    rng = np.random.default_rng((seed, _LESIONS))
    liver = next(e for t, e in anatomy.organs if t == TISSUE[HOST_ORGAN])
    log_lo, log_hi = np.log(options.lesion_volume_ml)
    volumes = sorted(np.exp(rng.uniform(log_lo, log_hi, count)), reverse=True)
    directions = rng.standard_normal((256, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    placed: list[tuple[Ellipsoid, float]] = []
    for volume in volumes:
        radius = (3 * volume * 1000 / (4 * np.pi)) ** (1 / 3)
        stretch = rng.uniform(0.8, 1.25, 2)
        axes = radius * np.array([stretch[0], stretch[1], 1 / (stretch[0] * stretch[1])])
        rotation, contrast = random_rotation(rng), float(rng.uniform(*options.contrast_hu))
        bound = float(axes.max()) + 3.0
        for _ in range(2000):
            centre = liver.centre + rng.uniform(-1, 1, 3) * liver.axes
            if not z_range[0] + bound <= centre[2] <= z_range[1] - bound:
                continue
            if any(np.linalg.norm(centre - e.centre) < bound + e.axes.max() + 2 for e, _ in placed):
                continue
            shell = centre + bound * directions
            x, y, z = shell[:, 0], shell[:, 1], shell[:, 2]
            if np.all(anatomy.paint(anatomy.plane(x, y), x, y, z) == TISSUE[HOST_ORGAN]):
                placed.append((Ellipsoid(centre, axes, rotation), contrast))
                break
        else:
            raise ValueError(
                f"phantom seed {seed}: cannot fit {count} lesions of {volumes} mL in the {HOST_ORGAN}"
            )
    return placed


def _floats(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _ellipsoid(lesion: Lesion) -> Ellipsoid:
    return Ellipsoid(np.array(lesion.centre_lps), np.array(lesion.semi_axes_mm), np.array(lesion.rotation))


def lesion_coverage(gt: GroundTruth, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Fraction of each voxel of an axis-aligned grid inside a lesion (partial volume), float32."""
    frac = np.zeros(shape, dtype=np.float32)
    for lesion in gt.lesions:
        box, part = _coverage(_ellipsoid(lesion), np.asarray(affine, float), shape)
        frac[box] = np.maximum(frac[box], part)
    return frac


def lesion_label_map(
    gt: GroundTruth, affine: np.ndarray | None = None, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """The ground-truth label map (voxel centre inside lesion n -> n), by default on the series grid."""
    affine = np.asarray(gt.affine if affine is None else affine, float)
    shape = gt.shape if shape is None else shape
    label = np.zeros(shape, dtype=np.uint8)
    for lesion in gt.lesions:
        box, inside = _coverage(_ellipsoid(lesion), affine, shape, centres=True)
        label[box][inside] = lesion.label
    return label


def phantom_ground_truth(
    seed: int = 0, lesions: int = 1, slices: int = 64, *, options: PhantomOptions | None = None
) -> GroundTruth:
    """The ground truth of a phantom without rendering it (cheap: anatomy and lesion placement only)."""
    options = options or PhantomOptions()
    anatomy, affine = body(seed), _grid(seed, slices, options)
    shape = (options.matrix, options.matrix, slices)
    z = _axes(affine, shape)[2]
    liver = next(e for t, e in anatomy.organs if t == TISSUE[HOST_ORGAN])
    sign = 1.0 if options.hyperdense else -1.0
    voxel_ml = float(np.prod(np.diag(affine)[:3])) / 1000.0
    truth = []
    for label, (lesion, contrast) in enumerate(
        _place_lesions(seed, lesions, anatomy, (z[0], z[-1]), options), 1
    ):
        count = int(_coverage(lesion, affine, shape, centres=True)[1].sum())
        truth.append(Lesion(
            label=label, centre_lps=_floats(lesion.centre), semi_axes_mm=_floats(lesion.axes),
            rotation=tuple(_floats(row) for row in lesion.rotation), radius_mm=float(np.prod(lesion.axes) ** (1 / 3)),
            volume_ml=float(4 / 3 * np.pi * np.prod(lesion.axes) / 1000), voxel_count=count,
            voxel_volume_ml=count * voxel_ml, contrast_hu=sign * contrast,
        ))  # fmt: skip
    noise_sd = float(np.random.default_rng((seed, _NOISE)).uniform(*options.noise_sd_hu))
    study, series, frame = (phantom_uid(seed, role) for role in ("study", "series", "frame_of_reference"))
    return GroundTruth(
        seed=seed, lesions=tuple(truth), shape=shape, affine=tuple(tuple(float(c) for c in row) for row in affine),
        organ=HOST_ORGAN, organ_centre_lps=_floats(liver.centre), organ_semi_axes_mm=_floats(liver.axes),
        organ_hu=float(anatomy.hu[TISSUE[HOST_ORGAN]]), noise_sd_hu=noise_sd, study_instance_uid=study,
        series_instance_uid=series, frame_of_reference_uid=frame, options=options,
    )  # fmt: skip


def make_phantom_volume(
    seed: int = 0,
    lesions: int = 1,
    slices: int = 64,
    *,
    options: PhantomOptions | None = None,
    region: tuple[slice, slice, slice] | None = None,
) -> tuple[Volume, np.ndarray, GroundTruth]:
    """Render a phantom in memory: (HU volume, lesion label map ``[i, j, k]`` uint8, ground truth).

    The ground truth always describes the full series grid (``options.matrix`` squared x ``slices``).
    ``region`` (index slices, step 1) renders only part of that grid, e.g. a training patch; the volume
    and the label map are then the region's. Noise is drawn for what is rendered, so a region has the
    same noise statistics as the full volume but not the same values.
    """
    gt = phantom_ground_truth(seed, lesions, slices, options=options)
    anatomy, full_affine = body(seed), np.array(gt.affine)
    window = [range(*s.indices(n)) for s, n in zip(region or (slice(None),) * 3, gt.shape, strict=True)]
    shape = (len(window[0]), len(window[1]), len(window[2]))
    affine = full_affine.copy()
    affine[:3, 3] += np.diag(full_affine)[:3] * [w.start for w in window]
    x, y, z = _axes(affine, shape)
    xx, yy = x[:, None], y[None, :]
    plane = anatomy.plane(xx, yy)
    image = anatomy.hu[np.stack([anatomy.paint(plane, xx, yy, zk) for zk in z], axis=-1)]
    for lesion in gt.lesions:
        box, frac = _coverage(_ellipsoid(lesion), affine, shape)
        image[box] = image[box] * (1 - frac) + (gt.organ_hu + lesion.contrast_hu) * frac
    noise_rng = np.random.default_rng((seed, _NOISE))
    noise_rng.uniform()  # the noise SD, drawn in phantom_ground_truth
    image += noise_rng.standard_normal(shape, dtype=np.float32) * np.float32(gt.noise_sd_hu)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.float32)  # what 12-bit storage keeps
    instances = tuple(InstanceRef(CT_IMAGE_STORAGE, phantom_uid(seed, f"sop/{k}")) for k in window[2])
    ids = (gt.study_instance_uid, gt.series_instance_uid, gt.frame_of_reference_uid)
    volume = Volume(image, affine, *ids, "CT", instances)
    return volume, lesion_label_map(gt, affine, shape), gt


def _dates(seed: int) -> dict[str, str]:
    """Study, content and birth dates/times derived from the seed (no clock)."""
    h = int.from_bytes(hashlib.sha256(f"pacs-triage-phantom/{seed}".encode()).digest()[:8], "big")
    study = datetime.date(2021, 1, 1) + datetime.timedelta(days=h % 1461)
    age = 35 + (h >> 12) % 50
    birth = study - datetime.timedelta(days=365 * age + (h >> 20) % 365)
    time = f"{8 + (h >> 32) % 10:02d}{(h >> 40) % 60:02d}{(h >> 48) % 60:02d}"
    return {"date": study.strftime("%Y%m%d"), "time": time, "birth": birth.strftime("%Y%m%d"), "age": f"{age:03d}Y"}  # fmt: skip


def _ds(value: float) -> str:
    return f"{value:.10g}"  # DS holds at most 16 characters


def write_phantom_series(
    out_dir: str | Path,
    seed: int = 0,
    lesions: int = 1,
    slices: int = 64,
    *,
    options: PhantomOptions | None = None,
) -> GroundTruth:
    """Write a CT Image Storage series (one file per slice), ``ground_truth.json`` and ``ground_truth_mask.npy``.

    The mask is the lesion label map ``[i, j, k]`` (0 background, n = lesion n) on the series grid.
    """
    volume, label, gt = make_phantom_volume(seed, lesions, slices, options=options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    when, affine = _dates(seed), volume.affine
    common = {
        "SpecificCharacterSet": "ISO_IR 100", "SOPClassUID": CT_IMAGE_STORAGE,
        "PatientName": f"PHANTOM^SEED{seed}", "PatientID": f"PH{seed:08d}", "PatientBirthDate": when["birth"],
        "PatientSex": "FM"[seed % 2], "PatientAge": when["age"],
        "StudyInstanceUID": gt.study_instance_uid, "StudyDate": when["date"], "StudyTime": when["time"],
        "AccessionNumber": f"PA{seed:08d}", "ReferringPhysicianName": "REFERRER^PHANTOM", "StudyID": f"{seed % 10**8}",
        "StudyDescription": "CT ABDOMEN PHANTOM", "Modality": "CT", "SeriesInstanceUID": gt.series_instance_uid,
        "SeriesNumber": 2, "SeriesDescription": f"Abdomen portal venous {affine[2, 2]:g} mm (phantom)", "BodyPartExamined": "ABDOMEN",
        "PatientPosition": "HFS", "SeriesDate": when["date"], "SeriesTime": when["time"],
        "FrameOfReferenceUID": gt.frame_of_reference_uid, "PositionReferenceIndicator": "",
        "Manufacturer": "pacs-triage", "ManufacturerModelName": "phantom", "SoftwareVersions": "1",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "AcquisitionNumber": 1,
        "ContentDate": when["date"], "ContentTime": when["time"],
        "PixelSpacing": [_ds(affine[1, 1]), _ds(affine[0, 0])],  # PS3.3 C.7.6.2.1.1: row, column spacing
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"], "SliceThickness": _ds(affine[2, 2]),
        "KVP": "120", "XRayTubeCurrent": 250, "ExposureTime": 500, "ConvolutionKernel": "STANDARD",
        "GantryDetectorTilt": "0", "ReconstructionDiameter": _ds(affine[0, 0] * volume.array.shape[0]),
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "Rows": volume.array.shape[1], "Columns": volume.array.shape[0],
        "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0,
        "RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU", "WindowCenter": "40", "WindowWidth": "400",
    }  # fmt: skip
    stored = (volume.array + 1024).astype(np.uint16)
    slices_total = len(volume.source_instances)
    for k, ref in enumerate(volume.source_instances):
        instance = slices_total - k  # numbered from the head down, as scanners do
        ds = pydicom.Dataset()
        for keyword, value in common.items():
            setattr(ds, keyword, value)
        position = affine[:3, 3] + k * affine[:3, 2]
        ds.SOPInstanceUID, ds.InstanceNumber = ref.sop_instance_uid, instance
        ds.ImagePositionPatient = [_ds(c) for c in position]
        ds.SliceLocation = _ds(position[2])
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows (j) x columns (i)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(ref.sop_instance_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.save_as(out / f"CT{instance:04d}.dcm", enforce_file_format=True)
    (out / "ground_truth.json").write_text(gt.to_json())
    np.save(out / "ground_truth_mask.npy", label)
    return gt
