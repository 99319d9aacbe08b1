"""What one pipeline is: a frozen, validated value object the worker builds once from the config.

A :class:`PipelineSpec` names the series it accepts (:class:`~pipeline.series_select.SelectionRule`),
the pinned bundles it runs (:class:`BundleSpec`), how findings become a priority
(:class:`~pipeline.measure.PriorityThresholds`) and whether a SEG is written. Everything in it that
can change a result also enters :meth:`PipelineSpec.identity`, so that the result UIDs of a changed
pipeline differ from the old ones (a changed report is a new report, never a "duplicate" the PACS
drops), while a re-run of the same pipeline on the same input yields the same UIDs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.detection_findings import DetectionOptions
from pipeline.findings import VolumeMethod
from pipeline.measure import PriorityThresholds
from pipeline.multiseries import MultiSeriesInput
from pipeline.series_select import SelectionRule
from vocabulary import is_sha256_hex

__all__ = ["BundleSpec", "PipelineSpec"]

# Domain separation for the spec digest and for the fingerprint handed to the writers.
_IDENTITY_NAMESPACE = "pacs-triage/pipeline-spec/v1"


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


@dataclass(frozen=True, kw_only=True)
class BundleSpec:
    """A MONAI bundle to load: its directory, the sha256 it is pinned by, where bundles may live.

    ``overrides`` maps config ids of ``inference.json`` to values (e.g. ``{"inferer#sw_batch_size":
    1}``); it is copied and made read-only. ``device`` is ``None`` for CUDA when present, else CPU.
    ``device`` and ``amp`` choose where the bundle runs, not what it computes, so they are not part
    of the pipeline's identity. ``invert_labels`` (resample the label map, not the probabilities:
    :mod:`pipeline.postprocess`) and ``cpu_bf16`` (bfloat16 autocast on CPU) are opt-in speed options
    that change labels a little: they enter the identity when on (and only then, so the UIDs of a
    pipeline that does not use them stay what they were).
    """

    path: Path
    sha256: str
    allowed_dirs: tuple[Path, ...]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    device: str | None = None
    amp: bool = True
    invert_labels: bool = False
    cpu_bf16: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "allowed_dirs", tuple(Path(d) for d in self.allowed_dirs))
        try:  # a deep, read-only copy; overrides come from TOML/JSON, so they are JSON values
            overrides = json.loads(json.dumps(dict(self.overrides)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"BundleSpec.overrides for {self.path} must be JSON values: {exc}") from exc
        object.__setattr__(self, "overrides", MappingProxyType(overrides))
        pinned = self.sha256.strip().lower()
        if not is_sha256_hex(pinned):
            raise ValueError(
                f"BundleSpec.sha256 for {self.path} must be 64 hex digits (see pipeline.bundle_runtime."
                f"bundle_sha256), got {self.sha256!r}"
            )
        object.__setattr__(self, "sha256", pinned)
        if not self.allowed_dirs:
            raise ValueError(
                f"BundleSpec.allowed_dirs for {self.path} is empty: a bundle is code, name the "
                "directories it may be loaded from"
            )

    def __hash__(self) -> int:
        return hash(
            (
                self.path,
                self.sha256,
                self.allowed_dirs,
                self.device,
                self.amp,
                self.invert_labels,
                self.cpu_bf16,
                self._overrides_json(),
            )
        )

    def _overrides_json(self) -> str:
        return _canonical_json(dict(self.overrides))

    def identity(self) -> dict[str, Any]:
        """What of this bundle determines its outputs: the pinned digest, the config overrides, the speed options."""
        identity: dict[str, Any] = {"sha256": self.sha256, "overrides": dict(self.overrides)}
        if self.invert_labels:
            identity["invert_labels"] = True
        if self.cpu_bf16:
            identity["cpu_bf16"] = True
        return identity


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """One analysis pipeline: selection rule, pinned bundles, triage thresholds, outputs."""

    name: str  # the pipeline name of the routing config; TID 4019 parameter of every result
    version: str  # bumped by whoever changes the pipeline; part of the result UIDs
    selection: SelectionRule  # multi-series: the reference (first) channel's rule
    segmentation: BundleSpec | None  # None: a classification-only pipeline (study-level probability)
    classification: BundleSpec | None = None
    thresholds: PriorityThresholds = field(default_factory=PriorityThresholds)
    make_seg: bool = True
    volume_method: VolumeMethod | None = None  # the volume triage compares; None: the voxel count
    # The labels and classes that are findings (empty: every non-background one); others are not reported.
    reported: frozenset[str] = frozenset()
    min_lesion_ml: float = 0.0  # smaller connected components are not lesions (not reported, not in the SEG)
    # Key images for at most this many lesions, the largest; the others are in the SR only. None: every one.
    max_key_images: int | None = None
    # Tint the key images where the classifier looked (Grad-CAM, pipeline.saliency); needs both bundles.
    saliency: bool = False
    # Several series of the study stacked as channels (pipeline.multiseries); None: one series.
    multiseries: MultiSeriesInput | None = None
    # A detection bundle (boxes, pipeline.detection) instead of segmentation/classification, and which boxes to report.
    detection: BundleSpec | None = None
    detection_options: DetectionOptions = field(default_factory=DetectionOptions)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("PipelineSpec.name must be a non-empty string")
        if not self.version.strip():
            raise ValueError(f"PipelineSpec.version of pipeline {self.name!r} must be a non-empty string")
        object.__setattr__(self, "reported", frozenset(self.reported))
        if self.detection is not None and (self.segmentation is not None or self.classification is not None):
            raise ValueError(
                f"pipeline {self.name!r}: a detection pipeline runs its detection bundle only; "
                "declare the segmentation or classification bundle as a pipeline of its own"
            )
        if self.segmentation is None and self.classification is None and self.detection is None:
            raise ValueError(
                f"pipeline {self.name!r} needs a segmentation or a classification bundle (or both), "
                "or a detection bundle"
            )
        if self.saliency and (self.segmentation is None or self.classification is None):
            raise ValueError(
                f"pipeline {self.name!r}: saliency overlays the classifier's Grad-CAM on the key images, "
                "so it needs both a segmentation and a classification bundle; set saliency = false or add the missing one"
            )
        if self.multiseries is not None and self.selection != self.multiseries.reference.rule:
            raise ValueError(
                f"pipeline {self.name!r}: selection must be the rule of the reference channel "
                f"{self.multiseries.reference.name!r} (the first declared), which gives the grid"
            )
        if not (math.isfinite(self.min_lesion_ml) and self.min_lesion_ml >= 0):
            raise ValueError(
                f"PipelineSpec.min_lesion_ml of pipeline {self.name!r} must be a finite number >= 0, "
                f"got {self.min_lesion_ml!r}"
            )
        if self.max_key_images is not None and self.max_key_images < 1:
            raise ValueError(
                f"PipelineSpec.max_key_images of pipeline {self.name!r} must be at least 1 (None: every lesion), "
                f"got {self.max_key_images!r}"
            )

    def identity(self) -> str:
        """Hex sha256 of everything in the spec that can change a result (not device or AMP)."""
        content = {
            "name": self.name,
            "version": self.version,
            "selection": self.selection.identity(),
            "segmentation": None if self.segmentation is None else self.segmentation.identity(),
            "classification": None if self.classification is None else self.classification.identity(),
            "thresholds": {
                "urgent_volume_ml": self.thresholds.urgent_volume_ml,
                "critical_volume_ml": self.thresholds.critical_volume_ml,
                "urgent_probability": self.thresholds.urgent_probability,
                "critical_probability": self.thresholds.critical_probability,
                "labels": sorted(self.thresholds.labels),
            },
            "make_seg": self.make_seg,
            "volume_method": None if self.volume_method is None else self.volume_method.value,
            "reported": sorted(self.reported),
            "min_lesion_ml": self.min_lesion_ml,
        }
        if self.saliency:  # only when on: the UIDs of pipelines without it stay as they were
            content["saliency"] = True
        if self.max_key_images is not None:  # likewise: uncapped pipelines keep their UIDs
            content["max_key_images"] = self.max_key_images
        if self.multiseries is not None:  # likewise: single-series identities stay as they were
            content["multiseries"] = self.multiseries.identity()
        if self.detection is not None:  # likewise
            content["detection"] = {**self.detection.identity(), **self.detection_options.identity()}
        return hashlib.sha256(f"{_IDENTITY_NAMESPACE}\n{_canonical_json(content)}".encode()).hexdigest()

    def result_fingerprint(self, input_fingerprint: str) -> str:
        """The fingerprint the writers derive result UIDs from: the input's and this pipeline's together.

        Same input and same spec: same UIDs (a re-run or resend is a duplicate). A different input,
        or a spec changed in anything that can change the result: different UIDs.
        """
        if not input_fingerprint:
            raise ValueError("input_fingerprint must be a non-empty string")
        digest = hashlib.sha256()
        for part in (_IDENTITY_NAMESPACE, input_fingerprint, self.identity()):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "big") + encoded)
        return f"{self.name}:{digest.hexdigest()}"
