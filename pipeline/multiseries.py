"""Multi-series inputs: several series of one study, each picked by its own rule, stacked as channels.

A bundle such as brats_mri_segmentation takes four MR series of one study as the channels of one
image (0 T1c, 1 T1, 2 T2, 3 FLAIR). A :class:`MultiSeriesInput` declares them in the bundle's channel
order, each with a :class:`~pipeline.series_select.SelectionRule` (Series Description, sequence name,
contrast, and the usual geometry tests). Then:

1. :func:`select_channels` picks one series per channel, in the declared order, each from the series
   not taken by an earlier channel; a channel that finds none is missing, and NoUsableSeries names
   every missing channel with the reason each series of the study was rejected.
2. :func:`stack_channels` builds each series' volume, refuses series of different frames of reference
   (their coordinates are not comparable) unless the pipeline declares them registered
   (``assume_registered``), resamples every channel onto the **reference grid, the first declared
   channel's series** (MONAI ``ResampleToMatch``, bilinear, zero outside a series' field of view), and
   stacks them as a :class:`MultiChannelVolume`: the reference volume (its geometry, its source
   instances: the SEG and SR are about it) plus ``channels`` ``[C, i, j, k]``.

The bundle runtime feeds ``channels`` as one channel-first MetaTensor (``original_channel_dim = 0``),
what the bundle's ``LoadImaged`` makes of a list of files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipeline.errors import BundleError, GeometryError, NoUsableSeries
from pipeline.geometry import load_volume
from pipeline.series_select import SelectedSeries, SelectionRule, select_series
from pipeline.volume import Volume

__all__ = [
    "Channel",
    "ChannelSelection",
    "MultiChannelVolume",
    "MultiSeriesInput",
    "UnregisteredSeries",
    "check_bundle_channels",
    "other_channel_headers",
    "select_channels",
    "stack_channels",
]

# Two grids closer than this (mm, in every affine entry) are the same grid: no resampling.
_SAME_GRID_TOL_MM = 1e-3


class UnregisteredSeries(GeometryError):
    """The channels' series have different frames of reference and no registration is declared."""


@dataclass(frozen=True, kw_only=True)
class Channel:
    """One input channel: its name (the bundle's ``channel_def``, e.g. "FLAIR") and the rule that picks it."""

    name: str
    rule: SelectionRule

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("Channel.name must be a non-empty string, e.g. 'T1c'")


@dataclass(frozen=True, kw_only=True)
class MultiSeriesInput:
    """The channels of a multi-series pipeline, in the bundle's input channel order.

    ``channels[0]`` is the reference: every other series is resampled onto its grid, and the
    findings, the SEG and the SR are about it. ``assume_registered``: the operator declares the
    series co-registered although their FrameOfReferenceUIDs differ (e.g. registered upstream);
    without it such a study is refused.
    """

    channels: tuple[Channel, ...]
    assume_registered: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if not self.channels:
            raise ValueError("MultiSeriesInput.channels is empty: declare one channel per input series")
        names = [c.name for c in self.channels]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"MultiSeriesInput: channel names must be unique; repeated: {repeated}")

    @property
    def reference(self) -> Channel:
        """The channel whose series gives the grid."""
        return self.channels[0]

    def identity(self) -> dict[str, object]:
        """What can change a result, as JSON values (pipeline.spec.PipelineSpec.identity)."""
        return {
            "channels": [{"name": c.name, "rule": c.rule.identity()} for c in self.channels],
            "assume_registered": self.assume_registered,
        }


@dataclass(frozen=True, eq=False, kw_only=True)
class MultiChannelVolume(Volume):
    """The reference channel's volume plus every channel resampled onto its grid.

    ``array``, ``affine``, the UIDs and ``source_instances`` are the reference series' (what the
    findings, SEG and SR describe); ``channels[c]`` is channel ``c`` (``channel_names[c]``, from
    series ``channel_series[c]``), float32 ``[i, j, k]`` on that grid.
    """

    channels: np.ndarray
    channel_names: tuple[str, ...]
    channel_series: tuple[str, ...]
    channel_paths: tuple[tuple[Path, ...], ...]  # the files of each channel's series (the results' evidence)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels.ndim != 4 or tuple(self.channels.shape[1:]) != tuple(self.array.shape):
            raise ValueError(
                f"MultiChannelVolume.channels must be [C, {', '.join(map(str, self.array.shape))}], "
                f"got {self.channels.shape}"
            )
        if not (
            len(self.channel_names)
            == len(self.channel_series)
            == len(self.channel_paths)
            == self.channels.shape[0]
        ):
            raise ValueError(
                f"{self.channels.shape[0]} channels, {len(self.channel_names)} names, "
                f"{len(self.channel_series)} series, {len(self.channel_paths)} file lists: one of each per channel"
            )
        self.channels.flags.writeable = False


@dataclass(frozen=True, kw_only=True)
class ChannelSelection:
    """The series chosen for each channel, in channel order, and the reasons."""

    series: tuple[SelectedSeries, ...]
    names: tuple[str, ...]

    @property
    def reason(self) -> str:
        """One line per channel: which series, and why."""
        return "; ".join(
            f"channel {i} {n!r}: {s.reason}"
            for i, (n, s) in enumerate(zip(self.names, self.series, strict=True))
        )

    @property
    def reference(self) -> SelectedSeries:
        """The reference channel's series, its reason the whole selection's (the runner reports it)."""
        return replace(self.series[0], reason=self.reason)


def _why_missing(
    everything: list[Path], channel: Channel, chosen: list[SelectedSeries], exc: NoUsableSeries
) -> str:
    """Why no series is left for ``channel``: every series of the study with its reason, or (when the
    ones it accepts feed earlier channels) which channel took them."""
    try:
        select_series(everything, channel.rule)
    except NoUsableSeries as full:
        return str(full)
    taken = ", ".join(s.series_instance_uid for s in chosen)
    return f"{exc}; the series it accepts ({taken}) feed earlier channels already"


def select_channels(
    paths: Iterable[str | os.PathLike[str]], inputs: MultiSeriesInput, *, pipeline: str = ""
) -> ChannelSelection:
    """One series per channel, in the declared order; NoUsableSeries names every missing channel."""
    everything = sorted({Path(p) for p in paths})
    remaining = everything
    chosen: list[SelectedSeries] = []
    missing: list[str] = []
    lost: list[str] = []
    for index, channel in enumerate(inputs.channels):
        try:
            selected = select_series(remaining, channel.rule)
        except NoUsableSeries as exc:
            missing.append(
                f"channel {index} {channel.name!r} is missing: {_why_missing(everything, channel, chosen, exc)}"
            )
            lost.append(channel.name)
            continue
        chosen.append(selected)
        taken = set(selected.paths)  # a series feeds one channel only
        remaining = [p for p in remaining if p not in taken]
    if missing:
        prefix = f"pipeline {pipeline!r}: " if pipeline else ""
        raise NoUsableSeries(
            f"{prefix}missing input series {', '.join(lost)} (the bundle takes "
            f"{', '.join(c.name for c in inputs.channels)}): " + "; ".join(missing)
        )
    return ChannelSelection(series=tuple(chosen), names=tuple(c.name for c in inputs.channels))


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.array.shape == b.array.shape and bool(np.allclose(a.affine, b.affine, atol=_SAME_GRID_TOL_MM))


def _resampled(volume: Volume, reference: Volume) -> np.ndarray:
    """``volume`` on ``reference``'s grid (both affines LPS mm): bilinear, zero outside its field of view."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    def meta_tensor(v: Volume, values: np.ndarray) -> MetaTensor:
        return MetaTensor(
            torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None],
            affine=torch.as_tensor(v.affine, dtype=torch.float64),
        )

    target = meta_tensor(reference, np.zeros(reference.array.shape, dtype=np.float32))
    out = ResampleToMatch(mode="bilinear", padding_mode="zeros", dtype=np.float32)(
        meta_tensor(volume, volume.array), target
    )
    return np.asarray(torch.as_tensor(out).detach().cpu().numpy()[0], dtype=np.float32)


MIN_COVERAGE = 0.5  # a channel seeing less of the reference grid than this is refused, not run on zeros
WARN_COVERAGE = 0.95  # below this the result notes how much of the grid the channel covers


def coverage(volume: Volume, reference: Volume, step: int = 4) -> float:
    """The fraction of ``reference``'s voxel centres (every ``step``-th in each axis) inside ``volume``'s
    field of view (within half a voxel of its outer voxel centres), through both LPS affines."""
    axes = [np.arange(0, n, step) if n > step else np.arange(n) for n in reference.array.shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    lps = ijk @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    src = (lps - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T
    upper = np.array(volume.array.shape, dtype=np.float64) - 0.5
    return float(np.all((src >= -0.5) & (src <= upper), axis=1).mean())


def _grid(v: Volume) -> str:
    return f"{'x'.join(map(str, v.array.shape))} at {'x'.join(f'{s:.3g}' for s in v.spacing)} mm"


def stack_channels(
    selection: ChannelSelection, inputs: MultiSeriesInput, *, pipeline: str = ""
) -> MultiChannelVolume:
    """Every channel's series on the reference grid, stacked; GeometryError names the channel that failed."""
    prefix = f"pipeline {pipeline!r}: " if pipeline else ""
    volumes: list[Volume] = []
    for index, (name, selected) in enumerate(zip(selection.names, selection.series, strict=True)):
        try:
            volumes.append(load_volume(selected.paths))
        except GeometryError as exc:
            raise type(exc)(
                f"{prefix}channel {index} {name!r}, series {selected.series_instance_uid}: {exc}"
            ) from exc
    reference = volumes[0]
    ref_name = selection.names[0]
    studies = sorted({v.study_instance_uid for v in volumes})
    if len(studies) > 1:
        raise GeometryError(
            f"{prefix}the channels' series belong to {len(studies)} studies {studies}; give one study"
        )
    frames = [(n, v) for n, v in zip(selection.names, volumes, strict=True)]
    differ = [(n, v) for n, v in frames if v.frame_of_reference_uid != reference.frame_of_reference_uid]
    notes: list[str] = list(reference.warnings)
    notes += [
        f"channel {n!r}: {w}"
        for n, v in zip(selection.names[1:], volumes[1:], strict=True)
        for w in v.warnings
    ]
    if differ:
        listed = "; ".join(
            f"{n!r} series {v.series_instance_uid} FrameOfReferenceUID {v.frame_of_reference_uid}"
            for n, v in frames
        )
        if not inputs.assume_registered:
            raise UnregisteredSeries(
                f"{prefix}the channels' series have different frames of reference and no registration is "
                f"declared, so their voxels cannot be stacked on one grid ({listed}); register them "
                "upstream into one frame of reference, or declare assume_registered = true if they are"
            )
        notes.append(
            f"frames of reference differ, stacked as declared registered (assume_registered): {listed}"
        )
    channels = []
    for name, volume in frames:
        if volume is reference or _same_grid(volume, reference):
            channels.append(np.asarray(volume.array, dtype=np.float32))
            continue
        covered = coverage(volume, reference)
        if covered < MIN_COVERAGE:
            raise GeometryError(
                f"{prefix}channel {name!r}, series {volume.series_instance_uid}, covers {covered:.0%} of the "
                f"reference grid of {ref_name!r} ({_grid(reference)}; at least {MIN_COVERAGE:.0%} needed): its "
                "field of view does not hold the reference series' anatomy, so the network would see zeros there"
            )
        channels.append(_resampled(volume, reference))
        notes.append(
            f"channel {name!r}: series {volume.series_instance_uid} resampled from {_grid(volume)} onto the "
            f"reference grid of {ref_name!r} ({_grid(reference)})"
            + (f"; it covers {covered:.0%} of that grid, zero outside" if covered < WARN_COVERAGE else "")
        )
    return MultiChannelVolume(
        array=reference.array,
        affine=reference.affine,
        study_instance_uid=reference.study_instance_uid,
        series_instance_uid=reference.series_instance_uid,
        frame_of_reference_uid=reference.frame_of_reference_uid,
        modality=reference.modality,
        source_instances=reference.source_instances,
        warnings=tuple(notes),
        channels=np.stack(channels),
        channel_names=selection.names,
        channel_series=tuple(v.series_instance_uid for v in volumes),
        channel_paths=tuple(s.paths for s in selection.series),
    )


def check_bundle_channels(
    meta: Mapping[str, Any], image_key: str, volume: MultiChannelVolume, bundle: str
) -> None:
    """BundleError unless the stack matches the input the bundle's ``metadata.json`` declares
    (``network_data_format.inputs.<image_key>``: ``num_channels``, and ``channel_def`` names in order,
    compared without case): a pipeline whose channels are declared in another order must not run."""
    inputs = meta.get("network_data_format", {}).get("inputs", {})
    declared = inputs.get(image_key) if isinstance(inputs, Mapping) else None
    if not isinstance(declared, Mapping):
        return
    count = declared.get("num_channels")
    if isinstance(count, int) and count != len(volume.channel_names):
        raise BundleError(
            f"bundle {bundle} takes {count} input channels, the pipeline stacks {len(volume.channel_names)} "
            f"({', '.join(volume.channel_names)}); declare one [[pipelines.monai.channels]] per input channel"
        )
    channel_def = declared.get("channel_def")
    if isinstance(channel_def, Mapping) and len(channel_def) == len(volume.channel_names):
        try:
            names = tuple(str(channel_def[k]) for k in sorted(channel_def, key=int))
        except ValueError:
            return
        if tuple(n.casefold() for n in names) != tuple(n.casefold() for n in volume.channel_names):
            raise BundleError(
                f"bundle {bundle} takes the channels {', '.join(names)} in this order (metadata.json "
                f"channel_def), the pipeline declares {', '.join(volume.channel_names)}; declare the "
                "[[pipelines.monai.channels]] in the bundle's order, with its names"
            )


def other_channel_headers(volume: MultiChannelVolume) -> list[Dataset]:
    """Headers of every channel's series but the reference's: evidence of the results too (the SR
    lists every image the findings were derived from: Current Requested Procedure Evidence, PS3.3 C.17.2)."""
    from pydicom import dcmread

    return [dcmread(p, stop_before_pixels=True) for paths in volume.channel_paths[1:] for p in paths]
