"""Findings: what the models found, as value objects the SR/SEG writers consume.

Only the value objects live here; computing them from a label volume is in ``measure.py``.

A :class:`Finding` is one lesion: one connected component of one reported label, at least the
pipeline's minimum size. Its position in :attr:`Findings.findings` (1-based) is its value in the
lesion map that :func:`pipeline.measure.measure_lesions` returns and the SEG writer encodes, so the
SR group, the SEG segment and the voxels stay one thing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vocabulary import Priority

__all__ = ["AlgorithmInfo", "Classification", "Code", "Detection", "Finding", "Findings", "VolumeMethod"]


class VolumeMethod(enum.Enum):
    """Which volume estimate the triage thresholds compare (the SR reports both, each coded)."""

    VOXEL_COUNT = "voxel count"  # segmented voxels x voxel volume: what the SEG shows
    PROBABILITY_SUM = "probability sum"  # sum of the label's probabilities x voxel volume (sub-voxel)


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme designator, meaning), e.g. SNOMED CT ``("78961009", "SCT", "Spleen")``."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not self.value or not self.scheme or not self.meaning:
            raise ValueError(f"Code needs value, scheme and meaning, got {self!r}")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identifies the algorithm (TID 4019): bundle name, version and the sha256 it was pinned by."""

    name: str
    version: str
    sha256: str
    pipeline: str  # the pipeline name from the routing config


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One lesion: a connected component of one segmented label (``lesion`` numbers them per label)."""

    label: int  # channel index in the bundle's output
    name: str  # the bundle's label name, e.g. "spleen" or "lesion"
    lesion: int = 1  # 1-based, per label, largest first
    volume_ml: float  # segmented voxels x voxel volume: the volume of the voxels the SEG shows
    largest_diameter_mm: float  # maximum Feret diameter, between voxel centres
    centroid_lps: tuple[float, float, float]  # mm, DICOM patient coordinates
    voxel_count: int = 0
    probability_volume_ml: float | None = None  # sum of probabilities x voxel volume, when known
    category: Code | None = None  # SNOMED segmented property category
    type: Code | None = None  # SNOMED segmented property type
    finding_site: Code | None = None  # SNOMED anatomic site, where the labels give one

    def __post_init__(self) -> None:
        if self.volume_ml < 0 or self.largest_diameter_mm < 0 or self.voxel_count < 0:
            raise ValueError(f"Finding {self.name!r}: volumes, counts and diameters are non-negative")
        if self.lesion < 1:
            raise ValueError(f"Finding {self.name!r}: lesion numbers start at 1, got {self.lesion}")

    @property
    def tracking_identifier(self) -> str:
        """How people and the SR/SEG name this lesion, e.g. ``"lesion 2"`` (TID 4108)."""
        return f"{self.name} {self.lesion}"

    def volume(self, method: VolumeMethod) -> float:
        """The volume in mL by ``method`` (the voxel count when no probability sum is known)."""
        if method is VolumeMethod.PROBABILITY_SUM and self.probability_volume_ml is not None:
            return self.probability_volume_ml
        return self.volume_ml


@dataclass(frozen=True, kw_only=True)
class Detection:
    """One box of a detection bundle (RetinaNet): an axis-aligned box in LPS patient coordinates, its score.

    ``box_lps`` is ``(x0, y0, z0, x1, y1, z1)`` in mm with ``x0 <= x1`` etc.: the box's extent along the
    patient's L, P and S axes (:mod:`pipeline.detection`). ``index`` numbers the boxes of one label,
    highest score first.
    """

    label: int  # class index of the detector
    name: str  # the class name, e.g. "nodule" (or "lesion" when the bundle names none)
    score: float  # the detector's class score for this box, in [0, 1]
    box_lps: tuple[float, float, float, float, float, float]
    index: int = 1
    category: Code | None = None
    type: Code | None = None
    finding_site: Code | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Detection {self.name!r}: score {self.score} not in [0, 1]")
        if len(self.box_lps) != 6 or any(
            not lo <= hi for lo, hi in zip(self.box_lps[:3], self.box_lps[3:], strict=True)
        ):
            raise ValueError(
                f"Detection {self.name!r}: box {self.box_lps} is not (x0, y0, z0, x1, y1, z1), x0 <= x1"
            )
        if self.index < 1:
            raise ValueError(f"Detection {self.name!r}: indices start at 1, got {self.index}")

    @property
    def centre_lps(self) -> tuple[float, float, float]:
        """The box centre, mm (LPS)."""
        lo, hi = self.box_lps[:3], self.box_lps[3:]
        return ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2)

    @property
    def size_mm(self) -> tuple[float, float, float]:
        """The box's extent along the left-right, anterior-posterior and head-foot axes, mm."""
        lo, hi = self.box_lps[:3], self.box_lps[3:]
        return (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])

    @property
    def tracking_identifier(self) -> str:
        """How people and the SR name this box, e.g. ``"nodule box 2"`` (TID 4108)."""
        return f"{self.name} box {self.index}"


@dataclass(frozen=True)
class Classification:
    """A classification output: the probability that ``name`` is present, and the model that said so."""

    name: str
    probability: float
    algorithm: AlgorithmInfo | None = None  # None: the findings' (segmentation) algorithm

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"Classification {self.name!r}: probability {self.probability} not in [0, 1]")


@dataclass(frozen=True)
class Findings:
    """Everything the pipeline concluded about one study."""

    algorithm: AlgorithmInfo  # the segmentation (or detection) model (TID 4019 of every lesion/box group)
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    classifications: tuple[Classification, ...] = field(default_factory=tuple)
    detections: tuple[Detection, ...] = field(default_factory=tuple)  # boxes of a detection bundle
    priority: Priority = Priority.ROUTINE
    summary: str = ""  # one plain-text line for viewers that only show text

    def algorithm_of(self, classification: Classification) -> AlgorithmInfo:
        """The model that produced ``classification``."""
        return classification.algorithm or self.algorithm

    @property
    def algorithms(self) -> tuple[AlgorithmInfo, ...]:
        """Every model behind these findings, each once, segmentation first."""
        seen = [self.algorithm]
        for c in self.classifications:
            if self.algorithm_of(c) not in seen:
                seen.append(self.algorithm_of(c))
        return tuple(seen)
