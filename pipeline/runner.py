"""``run(study files, spec) -> PipelineResult``: one study through one pipeline, pure compute.

    select_series ──▶ load_volume ──▶ source headers ──▶ segmentation ─┬─▶ measure ──▶ SEG ──▶ SR
        ▲  GeometryError: next qualifying series          (classification)┘

The series is chosen by the spec's rule; when its geometry is refused (GeometryError) the next
qualifying series is tried, in the same deterministic order select_series uses, and when none is
left NoUsableSeries names every series and why it was not used. The bundles are the pinned ones of
the spec, loaded once per process (``load_bundle``'s cache). The SR (and the SEG when the spec asks
for one and something was segmented) carry UIDs derived from the input fingerprint and the spec's
identity (:meth:`~pipeline.spec.PipelineSpec.result_fingerprint`), never from the clock; the
analysis time the caller passes in is their Content Date/Time.

Errors: :class:`~pipeline.errors.PermanentError` subclasses for input that will never work
(NoUsableSeries, GeometryError, BundleError, a result that cannot be encoded from these sources);
:class:`~pipeline.errors.TransientError` for resources (memory, a source file that cannot be read
any more).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage, SegmentationStorage

from pipeline.bundle_runtime import BundleKind, BundleRuntime, Prediction, load_bundle
from pipeline.detection_findings import findings_from_detections
from pipeline.errors import BundleError, GeometryError, NoUsableSeries, PermanentError, TransientError
from pipeline.findings import Findings, VolumeMethod
from pipeline.geometry import load_volume
from pipeline.measure import Measured, classifications, findings_from_prediction, summary_line, triage
from pipeline.multiseries import MultiChannelVolume, other_channel_headers, select_channels, stack_channels
from pipeline.saliency import saliency_map
from pipeline.series_select import SelectedSeries, select_series
from pipeline.spec import BundleSpec, PipelineSpec
from pipeline.volume import Volume
from pipeline.writers.key_images import write_box_key_images, write_key_images
from pipeline.writers.kos import write_kos
from pipeline.writers.seg import write_seg
from pipeline.writers.sr import write_sr

__all__ = ["STAGES", "PipelineResult", "run"]

#: Keys of :attr:`PipelineResult.timings`, in pipeline order.
STAGES: tuple[str, ...] = ("select", "load", "headers", "bundles", "inference", "measure", "write")


@dataclass(frozen=True, kw_only=True, eq=False)
class PipelineResult:
    """What one run produced: findings, result datasets (SR first, then SEG, key images, KOS), and how it went."""

    findings: Findings
    datasets: tuple[Dataset, ...]  # SR, then the SEG, the key images and their KOS when made
    study_instance_uid: str
    series_instance_uid: str  # the series the findings are about
    selection_reason: str  # why that series (select_series' reason, plus any fallback)
    refused: tuple[tuple[str, str], ...]  # (series UID, GeometryError message) of better series refused
    notes: tuple[str, ...]  # e.g. why no SEG was written
    timings: Mapping[str, float]  # seconds per stage, keys from STAGES (time.perf_counter)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("a PipelineResult holds at least the SR")
        object.__setattr__(self, "timings", MappingProxyType(dict(self.timings)))

    @property
    def sr(self) -> Dataset:
        """The TID 1500 Comprehensive 3D SR."""
        return self.datasets[0]

    @property
    def seg(self) -> Dataset | None:
        """The DICOM SEG, when one was written."""
        return next((ds for ds in self.datasets if ds.SOPClassUID == SegmentationStorage), None)

    @property
    def key_images(self) -> tuple[Dataset, ...]:
        """The key images (secondary captures), one per lesion (the largest when capped), in findings order."""
        return tuple(ds for ds in self.datasets if ds.SOPClassUID == SecondaryCaptureImageStorage)

    @property
    def kos(self) -> Dataset | None:
        """The Key Object Selection document that references the key images and the SR."""
        return next((ds for ds in self.datasets if ds.SOPClassUID == KeyObjectSelectionDocumentStorage), None)


class _Timer:
    """Accumulates perf_counter seconds per stage (a stage may be entered more than once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def _is_cpu_out_of_memory(exc: RuntimeError) -> bool:
    # PyTorch's CPU allocator raises a plain RuntimeError; only its message tells.
    text = str(exc)
    return "DefaultCPUAllocator" in text or "can't allocate memory" in text


@contextlib.contextmanager
def _resources(what: str) -> Iterator[None]:
    """Turn running out of memory into a TransientError: another time, or another worker, may have it."""
    try:
        yield
    except MemoryError as exc:
        raise TransientError(f"out of memory while {what}: {exc}") from exc
    except RuntimeError as exc:
        if not _is_cpu_out_of_memory(exc):
            raise
        raise TransientError(f"out of memory while {what}: {exc}") from exc


# --- series and volume ---------------------------------------------------------------------------


def _no_usable_series(
    spec: PipelineSpec,
    refused: Sequence[tuple[SelectedSeries, GeometryError]],
    rejected: Sequence[tuple[str, str]],
) -> NoUsableSeries:
    lines = [
        f"series {s.series_instance_uid} ({s.n_slices} slices): geometry refused: {e}" for s, e in refused
    ]
    lines += [f"series {uid}: {why}" for uid, why in rejected]
    return NoUsableSeries(
        f"pipeline {spec.name!r}: no usable series ({spec.selection.describe()}): " + "; ".join(lines)
    )


def _select_and_load(
    study_files: Sequence[Path], spec: PipelineSpec, timer: _Timer
) -> tuple[SelectedSeries, Volume, tuple[tuple[SelectedSeries, GeometryError], ...]]:
    """The best qualifying series whose geometry is trusted, its volume, and the better ones refused."""
    remaining = sorted({Path(p) for p in study_files})
    refused: list[tuple[SelectedSeries, GeometryError]] = []
    rejected: tuple[tuple[str, str], ...] = ()
    while True:
        try:
            with timer.stage("select"):
                selected = select_series(remaining, spec.selection)
        except NoUsableSeries as exc:
            if not refused:
                raise NoUsableSeries(f"pipeline {spec.name!r}: {exc}") from exc
            raise _no_usable_series(spec, refused, rejected) from refused[-1][1]
        if not refused:  # the first selection saw every series: its rejections are the study's
            rejected = selected.rejected
        try:
            with timer.stage("load"), _resources(f"loading series {selected.series_instance_uid}"):
                volume = load_volume(selected.paths)
        except GeometryError as exc:
            refused.append((selected, exc))
            taken = set(selected.paths)
            remaining = [p for p in remaining if p not in taken]
            if not remaining:
                raise _no_usable_series(spec, refused, rejected) from exc
            continue
        return selected, volume, tuple(refused)


def _select_and_stack(
    study_files: Sequence[Path], spec: PipelineSpec, timer: _Timer
) -> tuple[SelectedSeries, Volume, tuple[tuple[SelectedSeries, GeometryError], ...]]:
    """A multi-series pipeline's channels (pipeline.multiseries): the reference series, the stack."""
    assert spec.multiseries is not None
    with timer.stage("select"):
        chosen = select_channels(study_files, spec.multiseries, pipeline=spec.name)
    with (
        timer.stage("load"),
        _resources(f"loading the {len(chosen.series)} series of pipeline {spec.name!r}"),
    ):
        volume = stack_channels(chosen, spec.multiseries, pipeline=spec.name)
    return chosen.reference, volume, ()


def _source_headers(selected: SelectedSeries, volume: Volume) -> tuple[list[Dataset], list[Dataset]]:
    """Headers of the volume's source instances: (one per slice, in volume order; each instance once)."""
    by_uid: dict[str, Dataset] = {}
    for path in selected.paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except OSError as exc:  # it was read moments ago: the spool or its disk is in trouble
            raise TransientError(
                f"cannot re-read {path} of series {selected.series_instance_uid}: {exc}"
            ) from exc
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise GeometryError(
                f"series {selected.series_instance_uid}: {path.name} changed while the study was analysed: {exc}"
            ) from exc
        if not ds.get("FrameOfReferenceUID"):  # stripped from every slice (else geometry refused it):
            ds.FrameOfReferenceUID = volume.frame_of_reference_uid  # the results use the derived one
        by_uid[str(ds.get("SOPInstanceUID", ""))] = ds
    per_slice: list[Dataset] = []
    for ref in volume.source_instances:
        ds_ = by_uid.get(ref.sop_instance_uid)
        if ds_ is None:
            raise GeometryError(
                f"series {volume.series_instance_uid}: instance {ref.sop_instance_uid} of the volume is "
                "in none of the series' files any more"
            )
        per_slice.append(ds_)
    distinct = list({id(ds): ds for ds in per_slice}.values())  # dict keeps the first occurrence's order
    return per_slice, distinct


# --- models --------------------------------------------------------------------------------------


def _runtime(bundle: BundleSpec) -> BundleRuntime:
    return load_bundle(
        bundle.path,
        sha256=bundle.sha256,
        allowed_dirs=bundle.allowed_dirs,
        device=bundle.device,
        overrides=bundle.overrides,
        amp=bundle.amp,
        invert_labels=bundle.invert_labels,
        cpu_bf16=bundle.cpu_bf16,
    )


def _predict(runtime: BundleRuntime, volume: Volume, spec: PipelineSpec, expected: BundleKind) -> Prediction:
    with _resources(f"running bundle {runtime.name} on series {volume.series_instance_uid}"):
        prediction = runtime.predict(volume, pipeline=spec.name)
    if prediction.kind is not expected:
        raise BundleError(
            f"pipeline {spec.name!r}: bundle {runtime.path} is configured as its {expected.value} bundle "
            f"but outputs a {prediction.kind.value}"
        )
    return prediction


def _findings(
    segmentation: Prediction | None, classification: Prediction | None, volume: Volume, spec: PipelineSpec
) -> Measured:
    """Measure the segmentation (one finding per lesion), add the classification, and triage on both."""
    if segmentation is None:  # classification only: study-level probabilities -> priority
        assert classification is not None  # PipelineSpec needs one of the two
        return findings_from_prediction(
            classification, volume, spec.thresholds, reported=spec.reported, volume_method=spec.volume_method
        )
    measured = findings_from_prediction(
        segmentation,
        volume,
        spec.thresholds,
        min_volume_ml=spec.min_lesion_ml,
        reported=spec.reported,
        volume_method=spec.volume_method,
    )
    if classification is None or classification.class_probabilities is None:
        return measured
    found = measured.findings.findings
    classes = classifications(
        classification.label_names,
        classification.class_probabilities,
        algorithm=classification.algorithm,  # each group names the model that produced it
        reported=spec.reported,
    )
    method = spec.volume_method or VolumeMethod.VOXEL_COUNT
    priority, reason = triage(found, classes, spec.thresholds, method)
    return Measured(
        findings=Findings(
            algorithm=measured.findings.algorithm,
            findings=found,
            classifications=classes,
            priority=priority,
            summary=summary_line(priority, reason, found, classes),
        ),
        lesion_map=measured.lesion_map,
    )


# --- outputs -------------------------------------------------------------------------------------


def _write(
    spec: PipelineSpec,
    measured: Measured,
    volume: Volume,
    headers: tuple[list[Dataset], list[Dataset]],
    fingerprint: str,
    content_datetime: datetime.datetime,
    saliency: np.ndarray | None = None,
) -> tuple[tuple[Dataset, ...], tuple[str, ...]]:
    per_slice, distinct = headers
    findings = measured.findings
    notes: list[str] = []
    seg: Dataset | None = None
    try:
        if spec.make_seg and measured.lesion_map is not None:
            if not findings.findings:
                notes.append("no SEG: nothing was segmented")
            elif any(ref.frame_number is not None for ref in volume.source_instances):
                notes.append("no SEG: the source is multi-frame, which write_seg does not support")
            else:
                seg = write_seg(
                    measured.lesion_map,
                    volume,
                    per_slice,
                    findings,
                    input_fingerprint=fingerprint,
                    content_datetime=content_datetime,
                )
        sr = write_sr(
            findings,
            distinct,
            volume,
            input_fingerprint=fingerprint,
            seg=seg,
            content_datetime=content_datetime,
        )
    except ValueError as exc:  # the writers check that the sources can carry a valid object
        raise PermanentError(
            f"pipeline {spec.name!r}: no valid SR/SEG can be written for series {volume.series_instance_uid}: {exc}"
        ) from exc
    try:
        shown = _key_objects(
            measured,
            volume,
            per_slice,
            sr,
            fingerprint,
            content_datetime,
            notes,
            saliency,
            spec.max_key_images,
        )
    except ValueError as exc:  # the writers check that the sources can carry a valid object
        raise PermanentError(
            f"pipeline {spec.name!r}: no valid key images or KOS can be written for series "
            f"{volume.series_instance_uid}: {exc}"
        ) from exc
    return ((sr,) if seg is None else (sr, seg)) + shown, tuple(notes)


def _key_objects(
    measured: Measured,
    volume: Volume,
    per_slice: list[Dataset],
    sr: Dataset,
    fingerprint: str,
    content_datetime: datetime.datetime,
    notes: list[str],
    saliency: np.ndarray | None = None,
    max_images: int | None = None,
) -> tuple[Dataset, ...]:
    """The key images (:func:`_key_images`) and the KOS over them and the SR; none without key images."""
    images = _key_images(
        measured, volume, per_slice, fingerprint, content_datetime, notes, saliency, max_images
    )
    if not images:
        return ()
    kos = write_kos(
        images, sr, measured.findings, input_fingerprint=fingerprint, content_datetime=content_datetime
    )
    return (*images, kos)


def _key_images(
    measured: Measured,
    volume: Volume,
    per_slice: list[Dataset],
    fingerprint: str,
    content_datetime: datetime.datetime,
    notes: list[str],
    saliency: np.ndarray | None,
    max_images: int | None,
) -> tuple[Dataset, ...]:
    """One key image per lesion (its largest cross-section, outlined; the ``max_images`` largest when
    capped), or per box of a detector (the slice through its centre)."""
    if measured.lesion_map is None:  # a classification-only pipeline segments nothing; a detector has boxes
        return write_box_key_images(
            volume,
            per_slice,
            measured.findings,
            input_fingerprint=fingerprint,
            content_datetime=content_datetime,
        )
    if not measured.findings.findings:
        notes.append("no key images: nothing was segmented")
        return ()
    key_images = write_key_images(
        measured.lesion_map,
        volume,
        per_slice,
        measured.findings,
        input_fingerprint=fingerprint,
        content_datetime=content_datetime,
        saliency=saliency,
        max_images=max_images,
    )
    if not key_images:
        notes.append("no key images: no lesion has a voxel in the lesion map")
    elif max_images is not None and len(measured.findings.findings) > max_images:
        notes.append(
            f"key images for the {len(key_images)} largest of {len(measured.findings.findings)} lesions "
            "(the pipeline's max_key_images); the others are in the SR only"
        )
    return key_images


# --- the pipeline --------------------------------------------------------------------------------


def run(
    study_files: Sequence[str | os.PathLike[str]],
    spec: PipelineSpec,
    *,
    input_fingerprint: str,
    analysis_started: datetime.datetime,
) -> PipelineResult:
    """Run ``spec`` on the files of one study; return the findings and the SR (and SEG) to send back.

    ``input_fingerprint`` identifies the input (the study's instances as received); together with the
    spec's identity it fixes every result UID. ``analysis_started`` (the caller owns the clock: when
    the analysis began) is written as the results' Content and Instance Creation Date/Time (IHE AIR);
    it never enters a UID, so a re-run is still a duplicate. Raises PermanentError subclasses for unusable input, TransientError for resources.
    """
    if not input_fingerprint:
        raise ValueError("run needs a non-empty input_fingerprint")
    fingerprint = spec.result_fingerprint(input_fingerprint)
    timer = _Timer()

    if spec.multiseries is None:
        selected, volume, refused = _select_and_load([Path(p) for p in study_files], spec, timer)
    else:  # several series stacked as channels on the first one's grid
        selected, volume, refused = _select_and_stack([Path(p) for p in study_files], spec, timer)
    with timer.stage("headers"):
        headers = _source_headers(selected, volume)
        if isinstance(volume, MultiChannelVolume):  # the SR's evidence: every channel's series
            headers = (headers[0], headers[1] + other_channel_headers(volume))
    with timer.stage("bundles"):
        seg_runtime = None if spec.segmentation is None else _runtime(spec.segmentation)
        cls_runtime = None if spec.classification is None else _runtime(spec.classification)
        det_runtime = None if spec.detection is None else _runtime(spec.detection)
    with timer.stage("inference"):
        segmentation = (
            None if seg_runtime is None else _predict(seg_runtime, volume, spec, BundleKind.SEGMENTATION)
        )
        classification = (
            None if cls_runtime is None else _predict(cls_runtime, volume, spec, BundleKind.CLASSIFICATION)
        )
        detection = None if det_runtime is None else _predict(det_runtime, volume, spec, BundleKind.DETECTION)
    with timer.stage("measure"), _resources(f"measuring series {volume.series_instance_uid}"):
        if detection is None:
            measured = _findings(segmentation, classification, volume, spec)
        else:  # boxes (pipeline.detection_findings)
            opts = spec.detection_options
            measured = findings_from_detections(detection, spec.thresholds, opts, reported=spec.reported)
    saliency = None
    if (
        spec.saliency
        and cls_runtime is not None
        and measured.lesion_map is not None
        and measured.findings.findings
    ):
        with (
            timer.stage("inference"),
            _resources(f"saliency of bundle {cls_runtime.name} on series {volume.series_instance_uid}"),
        ):
            saliency = saliency_map(cls_runtime, volume)
    with timer.stage("write"), _resources(f"writing the results of series {volume.series_instance_uid}"):
        datasets, notes = _write(spec, measured, volume, headers, fingerprint, analysis_started, saliency)

    reason = selected.reason
    if refused:
        reason += "; chosen after refusing " + "; ".join(
            f"series {s.series_instance_uid} ({e})" for s, e in refused
        )
    return PipelineResult(
        findings=measured.findings,
        datasets=datasets,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        selection_reason=reason,
        refused=tuple((s.series_instance_uid, str(e)) for s, e in refused),
        notes=(*volume.warnings, *notes),  # what the volume assumed, e.g. a missing frame of reference
        timings=timer.seconds,
    )
