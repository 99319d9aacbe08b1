"""Which series of a study a pipeline runs on: rules, a deterministic choice, and reasons.

Only headers are read (``stop_before_pixels=True``). A series qualifies when it passes every test
of the :class:`SelectionRule` (geometry, and for multi-series pipelines Series Description and
sequence attributes: :mod:`pipeline.multiseries`); when several qualify the choice is deterministic (ORIGINAL\\PRIMARY
first, then most slices, thinnest, lowest SeriesNumber, lowest UID), and when none does,
NoUsableSeries lists every series with the reason it was rejected.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from pipeline.errors import GeometryError, NoUsableSeries
from pipeline.geometry import DUPLICATE_TOL_MM, slice_normal
from pipeline.headers import InstanceHeader, read_header
from pipeline.orientation import ORIENTATIONS, Orientation
from vocabulary import is_valid_uid

# Image storage SOP classes that can form a volume (PS3.4 B.5). Everything else (Secondary Capture,
# dose SR and other SR, presentation states, SEG, encapsulated PDF...) is skipped by class.
VOLUME_SOP_CLASSES: frozenset[str] = frozenset(
    {
        CTImageStorage,
        EnhancedCTImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        MRImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
    }
)

# ImageType values (PS3.3 C.7.6.1.1.2, C.8.2.1.1.1) that mark images that are not diagnostic volumes.
SKIPPED_IMAGE_TYPES: dict[str, str] = {
    "LOCALIZER": "localizer",
    "SCOUT": "scout",
    "DOSE_INFO": "dose report",
    "DOSE INFO": "dose report",
    "SCREEN SAVE": "screen capture",
    "CSA REPORT": "vendor report",
    "MOSAIC": "Siemens mosaic (slices tiled in one image)",
}

_AXIS_ORIENTATION = (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)


def _joined(values: Sequence[str]) -> str:
    return "\\".join(values)


def _names(orientations: Iterable[Orientation]) -> list[str]:
    return sorted(o.value for o in orientations)


def orientation_of(iop: Sequence[float], *, max_obliquity_deg: float = 30.0) -> Orientation:
    """Plane of an ImageOrientationPatient from the dominant LPS axis of its slice normal.

    The normal (row x column cosines, PS3.3 C.7.6.2.1.1) along x is sagittal, y coronal, z axial;
    ``oblique`` when it is more than ``max_obliquity_deg`` from that axis (the default, 30 deg,
    keeps gantry-tilted axial CT axial).
    """
    normal = np.abs(slice_normal(iop))
    axis = int(np.argmax(normal))
    if math.degrees(math.acos(min(1.0, float(normal[axis])))) > max_obliquity_deg:
        return Orientation.OBLIQUE
    return _AXIS_ORIENTATION[axis]


@dataclass(frozen=True, kw_only=True)
class SelectionRule:
    """What series a pipeline accepts."""

    modalities: frozenset[str]  # Modality values, e.g. frozenset({"CT"})
    orientations: frozenset[Orientation] = frozenset({Orientation.AXIAL})  # plain strings are accepted
    min_slices: int = 1  # distinct slice positions
    slice_thickness_mm: tuple[float, float] = (0.0, math.inf)  # inclusive range of SliceThickness
    require_original_primary: bool = False  # False: ORIGINAL\PRIMARY only preferred, DERIVED allowed
    # Which acquisition (the channels of a multi-series pipeline): regular expressions searched
    # (re.search; "(?i)" for case-insensitive) in SeriesDescription and in SequenceName (or
    # PulseSequenceName); contrast True/False: ContrastBolusAgent present/absent. None: any.
    series_description: str | None = None
    sequence_name: str | None = None
    contrast: bool | None = None

    def __post_init__(self) -> None:
        for name in ("series_description", "sequence_name"):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"SelectionRule.{name} {pattern!r} is not a regular expression: {exc}"
                ) from exc
        if not isinstance(self.modalities, frozenset) or not self.modalities:
            raise ValueError(
                f"SelectionRule.modalities must be a non-empty frozenset, got {self.modalities!r}"
            )
        if any(m != m.upper() or not m for m in self.modalities):
            raise ValueError(
                f"SelectionRule.modalities are upper-case DICOM Modality values: {self.modalities!r}"
            )
        if not isinstance(self.orientations, frozenset) or not self.orientations <= ORIENTATIONS:
            raise ValueError(
                f"SelectionRule.orientations must be a frozenset of {_names(ORIENTATIONS)}, got {self.orientations!r}"
            )
        object.__setattr__(self, "orientations", frozenset(Orientation(o) for o in self.orientations))
        if not self.orientations:
            raise ValueError("SelectionRule.orientations is empty: no series could ever qualify")
        if self.min_slices < 1:
            raise ValueError(f"SelectionRule.min_slices must be >= 1, got {self.min_slices}")
        low, high = self.slice_thickness_mm
        if not 0.0 <= low <= high:
            raise ValueError(
                f"SelectionRule.slice_thickness_mm must satisfy 0 <= min <= max, got {(low, high)}"
            )

    def describe(self) -> str:
        """The rule in one line, for messages."""
        low, high = self.slice_thickness_mm
        parts = [
            f"Modality in {sorted(self.modalities)}",
            f"orientation in {_names(self.orientations)}",
            f">= {self.min_slices} slices",
        ]
        if low > 0 or math.isfinite(high):
            parts.append(f"SliceThickness {low:g}-{high:g} mm")
        if self.require_original_primary:
            parts.append("ImageType ORIGINAL\\PRIMARY")
        if self.series_description is not None:
            parts.append(f"SeriesDescription ~ {self.series_description!r}")
        if self.sequence_name is not None:
            parts.append(f"SequenceName ~ {self.sequence_name!r}")
        if self.contrast is not None:
            parts.append("ContrastBolusAgent " + ("present" if self.contrast else "absent"))
        return ", ".join(parts)

    def identity(self) -> dict[str, object]:
        """What of the rule can change a result, as JSON values (pipeline.spec); the acquisition
        tests only when set, so that the identity of a rule without them stays what it was."""
        low, high = self.slice_thickness_mm
        content: dict[str, object] = {
            "modalities": sorted(self.modalities),
            "orientations": sorted(o.value for o in self.orientations),
            "min_slices": self.min_slices,
            "slice_thickness_mm": [low, high if math.isfinite(high) else "inf"],
            "require_original_primary": self.require_original_primary,
        }
        for name in ("series_description", "sequence_name", "contrast"):
            if getattr(self, name) is not None:
                content[name] = getattr(self, name)
        return content


@dataclass(frozen=True, kw_only=True)
class SelectedSeries:
    """The chosen series, and why."""

    series_instance_uid: str
    paths: tuple[Path, ...]  # every file of the series, sorted
    reason: str  # human-readable: what it is and why it won
    modality: str
    orientation: Orientation
    n_slices: int
    slice_thickness_mm: float | None
    series_number: int | None
    rejected: tuple[tuple[str, str], ...] = field(default=())  # (series UID, reason) of the others


@dataclass
class _Candidate:
    uid: str
    headers: list[InstanceHeader]
    modality: str = ""
    orientation: Orientation = Orientation.OBLIQUE
    n_slices: int = 0
    thickness: float | None = None
    original_primary: bool = False
    series_number: int | None = None

    def title(self) -> str:
        first = self.headers[0]
        number = "" if first.series_number is None else f"#{first.series_number} "
        desc = f"'{first.series_description}' " if first.series_description else ""
        return f"series {self.uid or '(no SeriesInstanceUID)'} ({number}{desc}{len(self.headers)} files)"

    def sort_key(self) -> tuple[bool, int, float, float, str]:
        return (
            not self.original_primary,
            -self.n_slices,
            math.inf if self.thickness is None else self.thickness,
            math.inf if self.series_number is None else float(self.series_number),
            self.uid,
        )


def _acquisition(hs: Sequence[InstanceHeader], rule: SelectionRule) -> str | None:
    """Why the series is not the acquisition the rule names (description, sequence, contrast), or None."""
    for pattern, what, values in (
        (rule.series_description, "SeriesDescription", {h.series_description for h in hs}),
        (rule.sequence_name, "SequenceName", {h.sequence_name for h in hs}),
    ):
        if pattern is None:
            continue
        missed = sorted(v for v in values if not re.search(pattern, v))
        if missed:
            return f"{what} {missed[0]!r} does not match {pattern!r}"
    if rule.contrast is not None:
        agents = sorted({h.contrast_agent for h in hs})
        if rule.contrast and "" in agents:
            return "no ContrastBolusAgent (a contrast-enhanced series is wanted)"
        if not rule.contrast and agents != [""]:
            return f"ContrastBolusAgent {[a for a in agents if a]} (a series without contrast is wanted)"
    return None


def _evaluate(c: _Candidate, rule: SelectionRule) -> str | None:
    """Fill in the candidate's facts; return why it is rejected, or None when it qualifies."""
    hs = c.headers
    modalities = sorted({h.modality for h in hs})
    if len(modalities) != 1:
        return f"mixed Modality {modalities}"
    c.modality = modalities[0]
    if c.modality not in rule.modalities:
        return f"Modality {c.modality or '(none)'} not in {sorted(rule.modalities)}"
    for sop_class in sorted({h.sop_class_uid for h in hs}):
        if sop_class not in VOLUME_SOP_CLASSES:
            name = UID(sop_class).name if sop_class else "(none)"
            return f"SOP class {sop_class} ({name}) is not a CT/MR image storage class"
    for h in hs:
        for value, what in SKIPPED_IMAGE_TYPES.items():
            if value in h.image_type:
                return f"{what}: ImageType {_joined(h.image_type)}"
    acquisition = _acquisition(hs, rule)
    if acquisition is not None:
        return acquisition
    c.original_primary = all(h.image_type[:2] == ("ORIGINAL", "PRIMARY") for h in hs)
    if rule.require_original_primary and not c.original_primary:
        types = sorted({_joined(h.image_type[:2]) for h in hs})
        return f"ImageType {types} is not ORIGINAL\\PRIMARY"
    frames = [f for h in hs for f in h.frames]
    if any(not h.frames for h in hs):
        return "multi-frame image without per-frame functional groups (frame positions unknown)"
    if any(f.position is None or f.orientation is None for f in frames):
        return "ImagePositionPatient/ImageOrientationPatient missing"
    orientations = Counter(orientation_of(f.orientation) for f in frames if f.orientation is not None)
    if len(orientations) > 1:
        return "mixed orientations " + ", ".join(f"{o} x{n}" for o, n in sorted(orientations.items()))
    c.orientation = next(iter(orientations))
    if c.orientation not in rule.orientations:
        return f"orientation {c.orientation} not in {_names(rule.orientations)}"
    assert frames[0].orientation is not None
    normal = slice_normal(frames[0].orientation)
    along = sorted(float(np.asarray(f.position) @ normal) for f in frames if f.position is not None)
    c.n_slices = 1 + sum(1 for a, b in zip(along, along[1:], strict=False) if b - a >= DUPLICATE_TOL_MM)
    if c.n_slices < len(frames):
        return (
            f"{len(frames)} images at only {c.n_slices} distinct positions "
            "(several phases, echoes or acquisitions in one series)"
        )
    if c.n_slices < rule.min_slices:
        return f"{c.n_slices} slices, fewer than {rule.min_slices}"
    thicknesses = {f.slice_thickness for f in frames}
    low, high = rule.slice_thickness_mm
    if None in thicknesses:
        if low > 0 or math.isfinite(high):
            return "SliceThickness missing, the rule needs it"
    else:
        values = sorted(t for t in thicknesses if t is not None)
        c.thickness = values[-1]
        outside = [t for t in values if not low <= t <= high]
        if outside:
            return f"SliceThickness {[f'{t:g}' for t in values]} mm outside {low:g}-{high:g} mm"
    c.series_number = hs[0].series_number
    return None


def select_series(paths: Iterable[str | os.PathLike[str]], rule: SelectionRule) -> SelectedSeries:
    """Choose the series of a study that ``rule`` accepts; raise NoUsableSeries saying why none does."""
    unreadable: list[str] = []
    by_series: dict[str, list[InstanceHeader]] = {}
    for path in sorted({Path(p) for p in paths}):
        try:
            header = read_header(path)
        except GeometryError as exc:
            unreadable.append(str(exc))
            continue
        by_series.setdefault(header.series_instance_uid, []).append(header)
    candidates = [_Candidate(uid, hs) for uid, hs in sorted(by_series.items())]
    qualified: list[_Candidate] = []
    rejected: list[tuple[_Candidate, str]] = []
    for c in candidates:
        if not is_valid_uid(c.uid):
            why: str | None = f"SeriesInstanceUID {c.uid!r} missing or not a valid UID (PS3.5 9.1)"
        else:
            why = _evaluate(c, rule)
        if why is None:
            qualified.append(c)
        else:
            rejected.append((c, why))
    if not qualified:
        lines = [f"{c.title()}: {why}" for c, why in rejected]
        if unreadable:
            lines.append(f"{len(unreadable)} unreadable file(s), e.g. {unreadable[0]}")
        if not lines:
            lines.append("the study has no files")
        raise NoUsableSeries(f"no series qualifies for the rule ({rule.describe()}): " + "; ".join(lines))
    qualified.sort(key=_Candidate.sort_key)
    best = qualified[0]
    thickness = "unknown" if best.thickness is None else f"{best.thickness:g} mm"
    kind = "ORIGINAL\\PRIMARY" if best.original_primary else "DERIVED/SECONDARY"
    reason = (
        f"{best.title()}: {best.modality} {best.orientation}, {best.n_slices} slices, "
        f"thickness {thickness}, {kind}; passes {rule.describe()}"
    )
    if len(qualified) > 1:
        others = ", ".join(f"{c.uid} ({c.n_slices} slices)" for c in qualified[1:4])
        reason += (
            f"; first of {len(qualified)} qualifying series by ORIGINAL\\PRIMARY, most slices, thinnest, "
            f"lowest SeriesNumber, lowest UID (others: {others})"
        )
    if rejected:
        reason += f"; {len(rejected)} series rejected"
    return SelectedSeries(
        series_instance_uid=best.uid,
        paths=tuple(h.path for h in best.headers),
        reason=reason,
        modality=best.modality,
        orientation=best.orientation,
        n_slices=best.n_slices,
        slice_thickness_mm=best.thickness,
        series_number=best.series_number,
        rejected=tuple((c.uid, why) for c, why in rejected),
    )
