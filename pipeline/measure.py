"""Measurements and triage from a label volume: volumes, components, diameters, centroids, priority.

Conventions: label and probability arrays are on the source grid of the :class:`~pipeline.volume.Volume`,
indexed ``[i, j, k]`` (probabilities ``[C, i, j, k]``); positions are reported in **LPS** patient
coordinates (mm) through ``volume.affine``. Label 0 is background and is never measured.

- Volume: ``voxel count x voxel volume`` always; when probabilities are given, also the sum of the
  label's probabilities x voxel volume (a sub-voxel estimate), and that one is reported
  (:attr:`LabelMeasurement.volume_method` says which).
- Components: 26-connectivity (voxels touching by a face, an edge or a corner are connected), with
  ``scipy.ndimage.label`` when SciPy is installed, else an equivalent NumPy union-find.
- Largest diameter: the maximum Feret diameter of the largest component, between voxel centres,
  in mm (so a one-voxel component measures 0 mm).
- Centroid: the mean voxel position of all the label's voxels, mapped to LPS.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.findings import AlgorithmInfo, Classification, Finding, Findings, VolumeMethod
from pipeline.labels import is_background, segment_codes
from pipeline.volume import Volume
from vocabulary import Priority

if TYPE_CHECKING:
    from pipeline.bundle_runtime import Prediction

__all__ = [
    "LabelMeasurement",
    "PriorityThresholds",
    "classifications",
    "connected_components",
    "findings_from_prediction",
    "max_feret_diameter_mm",
    "measure_labels",
    "summary_line",
    "triage",
]


@dataclass(frozen=True)
class LabelMeasurement:
    """The measurements of one label (all its connected components together)."""

    label: int
    name: str
    voxel_count: int
    voxel_count_volume_ml: float
    probability_volume_ml: float | None  # None when no probabilities were given
    volume_method: VolumeMethod  # which of the two estimates volume_ml reports
    n_components: int
    largest_diameter_mm: float  # max Feret diameter of the largest component
    centroid_lps: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.volume_method is VolumeMethod.PROBABILITY_SUM and self.probability_volume_ml is None:
            raise ValueError(f"label {self.name!r}: a probability-sum volume needs probabilities")

    @property
    def volume_ml(self) -> float:
        """The reported volume in mL, estimated by :attr:`volume_method`."""
        if self.volume_method is VolumeMethod.PROBABILITY_SUM and self.probability_volume_ml is not None:
            return self.probability_volume_ml
        return self.voxel_count_volume_ml

    def to_finding(self) -> Finding:
        """The :class:`Finding` with its SNOMED codes from :mod:`pipeline.labels`, where known."""
        codes = segment_codes(self.name)
        return Finding(
            label=self.label,
            name=self.name,
            volume_ml=self.volume_ml,
            n_components=self.n_components,
            largest_diameter_mm=self.largest_diameter_mm,
            centroid_lps=self.centroid_lps,
            category=codes.category if codes else None,
            type=codes.type if codes else None,
            finding_site=codes.finding_site if codes else None,
            volume_method=self.volume_method,
        )


@dataclass(frozen=True, kw_only=True)
class PriorityThresholds:
    """When a study becomes URGENT or STAT; a threshold left ``None`` never fires.

    A study is STAT if any counted label has volume >= ``critical_volume_ml`` or any counted
    class has probability >= ``critical_probability``; else URGENT on the ``urgent_*`` thresholds;
    else ROUTINE. ``labels`` names the labels/classes that count (empty: every non-background one).
    """

    urgent_volume_ml: float | None = None
    critical_volume_ml: float | None = None
    urgent_probability: float | None = None
    critical_probability: float | None = None
    labels: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("urgent_volume_ml", "critical_volume_ml"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PriorityThresholds.{name} must be a finite number >= 0, got {value!r}")
        for name in ("urgent_probability", "critical_probability"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"PriorityThresholds.{name} must be in [0, 1], got {value!r}")
        for kind in ("volume_ml", "probability"):
            urgent, critical = getattr(self, f"urgent_{kind}"), getattr(self, f"critical_{kind}")
            if urgent is not None and critical is not None and critical < urgent:
                raise ValueError(
                    f"PriorityThresholds.critical_{kind} ({critical}) is below urgent_{kind} ({urgent})"
                )
        object.__setattr__(self, "labels", frozenset(self.labels))

    def counts(self, name: str) -> bool:
        """Whether label/class ``name`` takes part in triage."""
        return name in self.labels if self.labels else not is_background(name)


# --- connected components ------------------------------------------------------------------------

# 13 of the 26 neighbour offsets, one of each opposite pair: every adjacency is visited once.
_HALF_NEIGHBOURS = tuple(
    (di, dj, dk) for di in (-1, 0, 1) for dj in (-1, 0, 1) for dk in (-1, 0, 1) if (di, dj, dk) > (0, 0, 0)
)


def _scipy_ndimage() -> object | None:
    try:
        return importlib.import_module("scipy.ndimage")
    except ImportError:
        return None


def _components_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components by union-find over voxel adjacencies (hook to min root, compress)."""
    padded = np.pad(mask.astype(bool), 1)
    flat = padded.ravel()
    strides = (padded.shape[1] * padded.shape[2], padded.shape[2], 1)
    voxels = np.flatnonzero(flat)
    node = np.full(flat.size, -1, dtype=np.int64)
    node[voxels] = np.arange(voxels.size)
    src, dst = [], []
    for offset in _HALF_NEIGHBOURS:
        neighbours = voxels + sum(o * s for o, s in zip(offset, strides, strict=True))
        linked = flat[neighbours]  # the padding keeps every neighbour index inside the array
        src.append(node[voxels[linked]])
        dst.append(node[neighbours[linked]])
    a, b = np.concatenate(src), np.concatenate(dst)
    parent = np.arange(voxels.size)
    while a.size:
        ra, rb = parent[a], parent[b]
        open_ = ra != rb
        a, b, ra, rb = a[open_], b[open_], ra[open_], rb[open_]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # path compression: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    roots, ids = np.unique(parent, return_inverse=True)
    labels = np.zeros(flat.size, dtype=np.int32)
    labels[voxels] = ids + 1
    inner = (slice(1, -1),) * 3
    return labels.reshape(padded.shape)[inner], int(roots.size)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of a 3-D mask: (int32 labels 1..n, 0 outside; n)."""
    if mask.ndim != 3:
        raise ValueError(f"connected_components needs a 3-D mask, got shape {mask.shape}")
    ndimage = _scipy_ndimage()
    if ndimage is not None:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))  # type: ignore[attr-defined]
        return labels.astype(np.int32, copy=False), int(n)
    return _components_numpy(mask)


# --- diameter ------------------------------------------------------------------------------------


def _line_extremes(points: np.ndarray) -> np.ndarray:
    """Points that are first or last on their line along each of the three axes (hull candidates)."""
    keep = np.ones(len(points), dtype=bool)
    for axis in range(3):
        a, b = [x for x in range(3) if x != axis]
        order = np.lexsort((points[:, axis], points[:, b], points[:, a]))
        key = points[order][:, (a, b)]
        new_line = np.ones(len(points), dtype=bool)
        new_line[1:] = np.any(key[1:] != key[:-1], axis=1)
        last = np.roll(new_line, -1)
        extreme = np.zeros(len(points), dtype=bool)
        extreme[order[new_line | last]] = True
        keep &= extreme
    return points[keep]


def _hull_2d(points: np.ndarray) -> np.ndarray:
    """Vertices of the 2-D convex hull of integer points (Andrew's monotone chain)."""
    pts = sorted({(int(p[0]), int(p[1])) for p in points})
    if len(pts) <= 2:
        return np.asarray(pts, dtype=np.int64)

    def turn(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def chain(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in seq:
            while len(out) >= 2 and turn(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    return np.asarray(chain(pts)[:-1] + chain(pts[::-1])[:-1], dtype=np.int64)


def _hull_vertex_superset(points: np.ndarray) -> np.ndarray:
    """A superset of the 3-D convex hull vertices: each is a 2-D hull vertex of its k-slice."""
    points = _line_extremes(points)
    points = points[np.argsort(points[:, 2], kind="stable")]
    ks, starts = np.unique(points[:, 2], return_index=True)
    out = []
    for k, start, stop in zip(ks, starts, [*starts[1:], len(points)], strict=True):
        hull = _hull_2d(points[start:stop, :2])
        out.append(np.column_stack([hull, np.full(len(hull), k)]))
    return np.concatenate(out)


def max_feret_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Largest distance in mm between two voxel centres of ``mask`` ([i, j, k]) under ``affine``."""
    points = np.argwhere(mask)
    if len(points) < 2:
        return 0.0
    # Hull vertices are an affine invariant, so candidates found in index space are exact in mm.
    candidates = _hull_vertex_superset(points).astype(np.float64)
    xyz = candidates @ np.asarray(affine, dtype=np.float64)[:3, :3].T
    xyz -= xyz.mean(axis=0)
    sq = np.einsum("ij,ij->i", xyz, xyz)
    best = 0.0
    for start in range(0, len(xyz), 1024):
        block = xyz[start : start + 1024]
        d2 = sq[start : start + 1024, None] + sq[None, :] - 2.0 * (block @ xyz.T)
        best = max(best, float(d2.max()))
    return math.sqrt(max(best, 0.0))


# --- measurements --------------------------------------------------------------------------------


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def measure_labels(
    labels: np.ndarray,
    volume: Volume,
    label_names: Sequence[str],
    *,
    probabilities: np.ndarray | None = None,
    volume_method: VolumeMethod | None = None,
) -> tuple[LabelMeasurement, ...]:
    """Measure every non-background label present in ``labels`` ([i, j, k], source grid of ``volume``).

    ``probabilities`` ([C, i, j, k], C = ``len(label_names)``), when given, adds the probability-sum
    volume. ``volume_method`` picks the reported estimate; by default the probability sum when
    probabilities are given, else the voxel count. Labels with no voxel are left out.
    """
    if volume_method is None:
        volume_method = VolumeMethod.VOXEL_COUNT if probabilities is None else VolumeMethod.PROBABILITY_SUM
    if labels.shape != volume.array.shape:
        raise ValueError(f"label volume shape {labels.shape} differs from the volume's {volume.array.shape}")
    if probabilities is not None and probabilities.shape != (len(label_names), *labels.shape):
        raise ValueError(
            f"probabilities shape {probabilities.shape}, expected {(len(label_names), *labels.shape)}"
        )
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(label_names))
    if len(counts) > len(label_names):
        raise ValueError(f"label value {len(counts) - 1} has no name; names are {list(label_names)}")
    voxel_ml = volume.voxel_volume_ml
    out = []
    for label in (int(x) + 1 for x in np.flatnonzero(counts[1:])):
        mask = labels == label
        box = _bounding_box(mask)
        components, n = connected_components(mask[box])
        sizes = np.bincount(components.ravel())[1:]
        largest = components == int(np.argmax(sizes)) + 1
        offset = np.array([s.start for s in box], dtype=np.float64)
        centroid = volume.index_to_patient(np.argwhere(mask[box]).mean(axis=0) + offset)[0]
        prob_ml = None
        if probabilities is not None:
            prob_ml = float(probabilities[label].sum(dtype=np.float64)) * voxel_ml
        out.append(
            LabelMeasurement(
                label=label,
                name=label_names[label],
                voxel_count=int(counts[label]),
                voxel_count_volume_ml=int(counts[label]) * voxel_ml,
                probability_volume_ml=prob_ml,
                volume_method=volume_method,
                n_components=n,
                largest_diameter_mm=max_feret_diameter_mm(largest, volume.affine),
                centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
            )
        )
    return tuple(out)


def classifications(label_names: Sequence[str], probabilities: Sequence[float]) -> tuple[Classification, ...]:
    """One :class:`Classification` per non-background class of a classification bundle."""
    if len(label_names) != len(probabilities):
        raise ValueError(f"{len(probabilities)} probabilities for {len(label_names)} class names")
    return tuple(
        Classification(name=name, probability=float(p))
        for name, p in zip(label_names, probabilities, strict=True)
        if not is_background(name)
    )


# --- triage --------------------------------------------------------------------------------------


def triage(
    findings: Sequence[Finding],
    classes: Sequence[Classification],
    thresholds: PriorityThresholds,
) -> tuple[Priority, str]:
    """The study's priority and the rule that set it (empty for ROUTINE)."""
    for priority, level in ((Priority.STAT, "critical"), (Priority.URGENT, "urgent")):
        volume_limit = getattr(thresholds, f"{level}_volume_ml")
        prob_limit = getattr(thresholds, f"{level}_probability")
        for f in findings:
            if volume_limit is not None and thresholds.counts(f.name) and f.volume_ml >= volume_limit:
                return priority, f"{f.name} {f.volume_ml:.1f} mL >= {level} threshold {volume_limit:g} mL"
        for c in classes:
            if prob_limit is not None and thresholds.counts(c.name) and c.probability >= prob_limit:
                return priority, f"P({c.name}) {c.probability:.2f} >= {level} threshold {prob_limit:g}"
    return Priority.ROUTINE, ""


def summary_line(
    priority: Priority,
    reason: str,
    findings: Sequence[Finding],
    classes: Sequence[Classification],
) -> str:
    """One plain-text line for viewers that show only text."""
    parts = [
        f"{f.name} {f.volume_ml:.1f} mL, {f.n_components} component{'s' if f.n_components != 1 else ''}, "
        f"largest diameter {f.largest_diameter_mm:.1f} mm"
        for f in findings
    ]
    parts += [f"P({c.name}) {c.probability:.2f}" for c in classes]
    head = f"{priority.name} ({reason})" if reason else priority.name
    return f"{head}: {'; '.join(parts) if parts else 'nothing segmented'}"


def findings_from_prediction(
    prediction: Prediction,
    volume: Volume,
    thresholds: PriorityThresholds,
    algorithm: AlgorithmInfo | None = None,
    volume_method: VolumeMethod | None = None,
) -> Findings:
    """Measure a bundle's :class:`~pipeline.bundle_runtime.Prediction` and triage the study.

    ``volume_method`` as in :func:`measure_labels`.
    """
    found: tuple[Finding, ...] = ()
    if prediction.labels is not None:
        measured = measure_labels(
            prediction.labels,
            volume,
            prediction.label_names,
            probabilities=prediction.probabilities,
            volume_method=volume_method,
        )
        found = tuple(m.to_finding() for m in measured)
    classes: tuple[Classification, ...] = ()
    if prediction.class_probabilities is not None:
        classes = classifications(prediction.label_names, prediction.class_probabilities)
    priority, reason = triage(found, classes, thresholds)
    return Findings(
        algorithm=algorithm or prediction.algorithm,
        findings=found,
        classifications=classes,
        priority=priority,
        summary=summary_line(priority, reason, found, classes),
    )
