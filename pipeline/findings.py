"""Findings: what the models found, as value objects the SR/SEG writers consume.

Only the value objects live here; computing them from a label volume is in ``measure.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vocabulary import Priority

__all__ = ["AlgorithmInfo", "Classification", "Code", "Finding", "Findings", "VolumeMethod"]


class VolumeMethod(enum.Enum):
    """How a reported volume was estimated."""

    VOXEL_COUNT = "voxel count"  # labelled voxels x voxel volume
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
class Finding:
    """One segmented label (all its connected components together)."""

    label: int  # channel index in the bundle's output
    name: str  # the bundle's label name, e.g. "spleen" or "lesion"
    volume_ml: float
    n_components: int
    largest_diameter_mm: float
    centroid_lps: tuple[float, float, float]  # mm, DICOM patient coordinates
    category: Code | None = None  # SNOMED segmented property category
    type: Code | None = None  # SNOMED segmented property type
    finding_site: Code | None = None  # SNOMED anatomic site, where the labels give one
    volume_method: VolumeMethod = VolumeMethod.VOXEL_COUNT  # how volume_ml was estimated

    def __post_init__(self) -> None:
        if self.volume_ml < 0 or self.n_components < 0 or self.largest_diameter_mm < 0:
            raise ValueError(f"Finding {self.name!r}: volumes, counts and diameters are non-negative")


@dataclass(frozen=True)
class Classification:
    """A classification output: the probability that ``name`` is present."""

    name: str
    probability: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"Classification {self.name!r}: probability {self.probability} not in [0, 1]")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identifies the algorithm (TID 4019): bundle name, version and the sha256 it was pinned by."""

    name: str
    version: str
    sha256: str
    pipeline: str  # the pipeline name from the routing config


@dataclass(frozen=True)
class Findings:
    """Everything the pipeline concluded about one study."""

    algorithm: AlgorithmInfo
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    classifications: tuple[Classification, ...] = field(default_factory=tuple)
    priority: Priority = Priority.ROUTINE
    summary: str = ""  # one plain-text line for viewers that only show text
