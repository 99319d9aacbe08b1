"""The MONAI pipeline behind the worker's :class:`~daemon.pipelines.base.Pipeline` interface.

Two kinds of MONAI pipelines are registered by name:

* ``demo``: :func:`pipeline.demo.bundle.demo_spec`, the phantom-trained bundles shipped with pacs-triage
  (or ``pipelines.demo_bundle_dir``), pinned by their committed ``PINS.json``;
* every ``[[pipelines.monai]]`` entry of the configuration (bundle directories, sha256 pins,
  allowed directories, series selection, thresholds, SEG on or off).

Each worker process builds a pipeline once (``daemon.pipelines.registry.Pipelines``) and
``pipeline.bundle_runtime.load_bundle`` keeps the loaded networks for the process, so only the
first job of a worker pays for loading the weights.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from daemon.config import BundleConfig, ChannelConfig, Config, MonaiPipelineConfig
from daemon.pipelines.base import AnalysisOutcome, Pipeline
from pipeline.detection_findings import DetectionOptions
from pipeline.errors import PipelineError
from pipeline.measure import PriorityThresholds
from pipeline.multiseries import Channel, MultiSeriesInput
from pipeline.series_select import SelectionRule
from pipeline.spec import BundleSpec, PipelineSpec

DEMO = "demo"


class MonaiPipeline:
    """Runs ``pipeline.runner.run`` with one :class:`~pipeline.spec.PipelineSpec`."""

    def __init__(self, name: str, spec: PipelineSpec) -> None:
        self.name = name  # the routing name
        self.version = spec.version
        self.spec = spec

    def warm(self) -> None:
        """Import torch, MONAI and the writers and load the pinned bundles now (worker start), not on
        the first job; the runner then finds them in the per-process cache. BundleError when one fails."""
        from pipeline import runner

        for bundle in (self.spec.segmentation, self.spec.classification, self.spec.detection):
            if bundle is not None:
                runner._runtime(bundle)  # the runner's own loader: the same cache key as a job's

    def run(
        self,
        study_files: Sequence[Path],
        *,
        input_fingerprint: str,
        analysis_started: datetime.datetime | None = None,
    ) -> AnalysisOutcome:
        """Analyse one study; PermanentError (no usable series, geometry, bundle) fails the job.

        ``analysis_started`` (local time, as DICOM dates are) becomes the results' Content Date/Time
        (IHE AIR: when the analysis began); the worker's clock when not given. pipeline/ never
        reads the clock.
        """
        from pipeline import runner  # torch and MONAI: imported by workers only, not by `serve`

        started = analysis_started or datetime.datetime.now().replace(microsecond=0)
        result = runner.run(
            study_files, self.spec, input_fingerprint=input_fingerprint, analysis_started=started
        )
        lines = [
            result.findings.summary,
            f"series {result.series_instance_uid}: {result.selection_reason}",
            *result.notes,
        ]
        return AnalysisOutcome(
            priority=result.findings.priority,
            summary="\n".join(line for line in lines if line),
            datasets=result.datasets,
            stage_seconds=dict(result.timings),
        )


def _bundle(
    entry: BundleConfig,
    allowed: tuple[Path, ...],
    device: str | None,
    amp: bool,
    *,
    invert_labels: bool = False,
    cpu_bf16: bool = False,
) -> BundleSpec:
    return BundleSpec(
        path=entry.path,
        sha256=entry.sha256,
        allowed_dirs=allowed,
        overrides=entry.overrides,
        device=device,
        amp=amp,
        invert_labels=invert_labels,
        cpu_bf16=cpu_bf16,
    )


def _rule(entry: MonaiPipelineConfig, channel: ChannelConfig | None = None) -> SelectionRule:
    """The entry's series tests, and a channel's (description, sequence, contrast) when given."""
    return SelectionRule(
        modalities=frozenset(entry.modalities),
        orientations=frozenset(entry.orientations),
        min_slices=entry.min_slices,
        slice_thickness_mm=(
            entry.min_slice_thickness,
            math.inf if entry.max_slice_thickness is None else entry.max_slice_thickness,
        ),
        require_original_primary=entry.require_original_primary,
        series_description=None if channel is None else channel.series_description,
        sequence_name=None if channel is None else channel.sequence_name,
        contrast=None if channel is None else channel.contrast,
    )


def spec_from_config(entry: MonaiPipelineConfig) -> PipelineSpec:
    """The pipeline spec of one ``[[pipelines.monai]]`` entry (ValueError names what is wrong)."""
    selection = _rule(entry)
    multiseries = None
    if entry.channels:  # one series per channel: the pipeline's tests plus the channel's own
        multiseries = MultiSeriesInput(
            channels=tuple(Channel(name=c.name, rule=_rule(entry, c)) for c in entry.channels),
            assume_registered=entry.assume_registered,
        )
        selection = multiseries.reference.rule
    t = entry.thresholds
    thresholds = PriorityThresholds(
        urgent_volume_ml=t.urgent_volume_ml,
        critical_volume_ml=t.critical_volume_ml,
        urgent_probability=t.urgent_probability,
        critical_probability=t.critical_probability,
        labels=frozenset(t.labels),
    )
    return PipelineSpec(
        name=entry.name,
        version=entry.version,
        selection=selection,
        segmentation=(
            None
            if entry.segmentation is None
            else _bundle(
                entry.segmentation,
                entry.allowed_dirs,
                entry.device,
                entry.amp,
                invert_labels=entry.invert_labels,
                cpu_bf16=entry.cpu_bf16,
            )
        ),
        classification=(
            None
            if entry.classification is None
            else _bundle(
                entry.classification, entry.allowed_dirs, entry.device, entry.amp, cpu_bf16=entry.cpu_bf16
            )
        ),
        thresholds=thresholds,
        make_seg=entry.make_seg,
        volume_method=entry.volume_method,
        min_lesion_ml=entry.min_lesion_ml,
        max_key_images=entry.max_key_images,
        saliency=entry.saliency,
        multiseries=multiseries,
        detection=(
            None
            if entry.detection is None
            else _bundle(
                entry.detection, entry.allowed_dirs, entry.device, entry.amp, cpu_bf16=entry.cpu_bf16
            )
        ),
        detection_options=DetectionOptions(min_score=entry.min_score, max_boxes=entry.max_boxes),
    )


def demo_pipeline_spec(config: Config) -> PipelineSpec:
    """The demo pipeline's spec; BundleError (a PermanentError) when its bundles are not there."""
    from pipeline.demo.bundle import DEMO_BUNDLE_DIR, demo_spec  # imports torch

    return demo_spec(
        bundle_dir=config.pipelines.demo_bundle_dir or DEMO_BUNDLE_DIR, device=config.pipelines.demo_device
    )


def monai_factories(config: Config) -> dict[str, Callable[[], Pipeline]]:
    """Factories of the demo pipeline and of every configured MONAI pipeline, by routing name."""

    def configured(entry: MonaiPipelineConfig) -> Callable[[], Pipeline]:
        return lambda: MonaiPipeline(entry.name, spec_from_config(entry))

    factories: dict[str, Callable[[], Pipeline]] = {
        DEMO: lambda: MonaiPipeline(DEMO, demo_pipeline_spec(config))
    }
    for entry in config.pipelines.monai:
        factories[entry.name] = configured(entry)
    return factories


def check_specs(config: Config, names: Sequence[str]) -> list[str]:
    """Problems with the MONAI pipelines ``names`` (as routed), one sentence each; empty when fine."""
    problems = []
    entries = {entry.name: entry for entry in config.pipelines.monai}
    for name in sorted(set(names)):
        try:
            if name == DEMO:
                demo_pipeline_spec(config)
            elif name in entries:
                spec = spec_from_config(entries[name])
                # Only the paths: a receiver-only host may not hold the bundles its GPU workers load.
                for bundle in (spec.segmentation, spec.classification, spec.detection):
                    if bundle is not None and not any(
                        bundle.path.is_relative_to(d) for d in bundle.allowed_dirs
                    ):
                        problems.append(
                            f"pipeline {name!r}: bundle {bundle.path} is outside allowed_dirs "
                            f"{[str(d) for d in bundle.allowed_dirs]}"
                        )
        except (ValueError, PipelineError) as exc:  # a bad spec, or BundleError (demo not pinned)
            problems.append(f"pipeline {name!r}: {exc}")
    return problems
