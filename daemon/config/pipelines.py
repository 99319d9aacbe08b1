"""Analysis pipelines: the built-in ones and named MONAI pipelines with their pinned bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from daemon.config.base import Name, Regex, _Section
from pipeline.findings import VolumeMethod
from pipeline.orientation import Orientation
from vocabulary import is_sha256_hex

BUILTIN_PIPELINES = ("echo", "noop", "demo")  # names a [[pipelines.monai]] entry may not take
# Defaults of a [[pipelines.monai]] entry that `bundle check` runs with too. Every segmentation
# network leaves specks of a few voxels (random weights: hundreds); 0.1 mL is a sphere of 5.8 mm.
DEFAULT_MIN_LESION_ML = 0.1
DEFAULT_MAX_KEY_IMAGES = 10


class BundleConfig(_Section):
    """A MONAI Model Zoo bundle directory, pinned by the sha256 of its contents."""

    path: Path
    # pipeline.bundle_runtime.bundle_sha256 of the directory: `python -c "from pipeline.bundle_runtime
    # import bundle_sha256; print(bundle_sha256('DIR'))"`. A bundle is code: it is never loaded unpinned.
    sha256: str
    # Values for ids of inference.json, e.g. {"inferer#sw_batch_size" = 1}; part of the pipeline's identity.
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not is_sha256_hex(value.strip().lower()):
            raise ValueError(f"{value!r} is not a sha256 (64 hex digits)")
        return value.strip().lower()


class ThresholdsConfig(_Section):
    """When findings make a study URGENT or STAT; a threshold left out never fires."""

    urgent_volume_ml: float | None = Field(default=None, ge=0)
    critical_volume_ml: float | None = Field(default=None, ge=0)
    urgent_probability: float | None = Field(default=None, ge=0, le=1)
    critical_probability: float | None = Field(default=None, ge=0, le=1)
    labels: tuple[str, ...] = ()  # labels/classes that count; empty: every non-background one


class ChannelConfig(_Section):
    """One input series of a multi-series pipeline ([[pipelines.monai.channels]]), in the bundle's
    channel order; the pipeline's modalities, orientations, slice and ImageType tests apply to each."""

    name: str = Field(min_length=1, max_length=64)  # the bundle's channel_def name, e.g. "FLAIR"
    series_description: Regex | None = None  # regular expression searched in SeriesDescription
    sequence_name: Regex | None = None  # regular expression searched in SequenceName / PulseSequenceName
    contrast: bool | None = None  # true: ContrastBolusAgent present; false: absent; unset: either


class MonaiPipelineConfig(_Section):
    """A named MONAI pipeline: which series it takes, the pinned bundles it runs, how it triages.

    Routing rules name it by ``name``. Everything that can change a result is part of the result
    UIDs (pipeline.spec.PipelineSpec.identity): change a threshold and the next report is a new one.
    """

    name: Name
    version: str = Field(default="1", min_length=1, max_length=16)  # bump when you change the pipeline
    # At least one of the two: segmentation only, classification only (a study-level probability
    # sets the priority; no SEG, no key images), or both.
    segmentation: BundleConfig | None = None
    classification: BundleConfig | None = None
    # Or, alone, a detection bundle (e.g. lung_nodule_ct_detection): one SR group and key image per box.
    detection: BundleConfig | None = None
    # Boxes reported: score at least min_score (None: every box the bundle returns, its own threshold
    # decides), at most max_boxes of them, highest score first.
    min_score: float | None = Field(default=None, ge=0, le=1)
    max_boxes: int = Field(default=10, ge=1)
    allowed_dirs: tuple[Path, ...] = Field(min_length=1)  # bundles load only from inside these
    modalities: tuple[str, ...] = ("CT",)
    orientations: tuple[Orientation, ...] = (Orientation.AXIAL,)
    min_slices: int = Field(default=16, ge=1)
    min_slice_thickness: float = Field(default=0.0, ge=0)  # mm
    max_slice_thickness: float | None = Field(default=None, ge=0)  # mm; None: no upper limit
    require_original_primary: bool = False
    thresholds: ThresholdsConfig = ThresholdsConfig()
    make_seg: bool = True  # also send a DICOM SEG when something was segmented
    # Connected components smaller than this are not lesions: not in the SR, the SEG or the key images.
    min_lesion_ml: float = Field(default=DEFAULT_MIN_LESION_ML, ge=0, allow_inf_nan=False)
    # Key images for at most this many lesions, the largest; the SR lists every lesion.
    max_key_images: int = Field(default=DEFAULT_MAX_KEY_IMAGES, ge=1)
    volume_method: VolumeMethod | None = None  # "voxel count" or "probability sum"; None: the bundle's best
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: CUDA when present, else CPU
    amp: bool = True  # mixed precision on CUDA
    # Speed options (issue 15), off by default; each changes labels a little and so the result UIDs:
    # invert_labels: where the bundle resamples its probabilities to the source grid and takes the
    # argmax after (spleen, demo), take the argmax first and resample the label map (nearest), as
    # wholeBody's bundle does; no "probability sum" volume then. cpu_bf16: bfloat16 autocast on CPU.
    invert_labels: bool = False
    cpu_bf16: bool = False
    # Key images: tint where the classification bundle looked (Grad-CAM); needs both bundles. Off by default.
    saliency: bool = False
    # Multi-series input (e.g. brats: T1c, T1, T2, FLAIR): one series per channel, stacked in this
    # order on the first channel's grid. Empty: one series, chosen by the tests above.
    channels: tuple[ChannelConfig, ...] = ()
    # The channels' series are co-registered although their FrameOfReferenceUIDs differ; without
    # it such a study is refused.
    assume_registered: bool = False

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError("at least one Modality, e.g. ['CT']")
        return tuple(v.strip().upper() for v in values)

    @model_validator(mode="after")
    def _checks(self) -> MonaiPipelineConfig:
        if self.name in BUILTIN_PIPELINES:
            raise ValueError(f"pipeline name {self.name!r} is built in; choose another")
        if self.detection is not None and (self.segmentation is not None or self.classification is not None):
            raise ValueError(
                f"pipeline {self.name!r}: a detection bundle runs alone; declare the segmentation or "
                "classification bundle in a [[pipelines.monai]] entry of its own"
            )
        if self.segmentation is None and self.classification is None and self.detection is None:
            raise ValueError(
                f"pipeline {self.name!r}: give a segmentation bundle, a classification bundle, or both "
                "(or a detection bundle)"
            )
        names = [c.name for c in self.channels]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"pipeline {self.name!r}: channel names must be unique; repeated: {repeated}")
        if self.assume_registered and not self.channels:
            raise ValueError(f"pipeline {self.name!r}: assume_registered needs [[pipelines.monai.channels]]")
        if self.max_slice_thickness is not None and self.max_slice_thickness < self.min_slice_thickness:
            raise ValueError(
                f"pipeline {self.name!r}: max_slice_thickness ({self.max_slice_thickness}) is below "
                f"min_slice_thickness ({self.min_slice_thickness})"
            )
        return self


class PipelinesConfig(_Section):
    """Analysis pipelines: the built-in ones (echo, noop, demo) and named MONAI pipelines."""

    echo_delay_seconds: float = Field(default=0.0, ge=0)  # the echo pipeline waits this long (demos, tests)
    # The "demo" pipeline: the phantom-trained bundles shipped in pipeline/demo/bundles (default), or a
    # directory laid out the same way (lesion_seg/, lesion_cls/, PINS.json).
    demo_bundle_dir: Path | None = None
    demo_device: str | None = None  # as MonaiPipelineConfig.device
    monai: tuple[MonaiPipelineConfig, ...] = ()  # [[pipelines.monai]] entries

    @model_validator(mode="after")
    def _unique(self) -> PipelinesConfig:
        names = [p.name for p in self.monai]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"pipelines.monai: names must be unique; repeated: {', '.join(repeated)}")
        return self
