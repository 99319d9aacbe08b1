"""Run a MONAI Model Zoo bundle on an in-memory :class:`~pipeline.volume.Volume`.

A bundle directory has the Model Zoo layout: ``configs/metadata.json``, ``configs/inference.json``
and its weights in ``models/`` (``model.pt``, a state dict, or ``model.ts``, TorchScript).

Conventions:

- The input volume is indexed ``[i, j, k]`` (column, row, slice) and its affine maps ``(i, j, k, 1)``
  to **LPS** mm. It is fed to the bundle as a ``MetaTensor`` with that affine, ``meta["space"] = "LPS"``
  and ``meta["original_channel_dim"] = "no_channel"``, exactly what the bundle's ``LoadImaged`` would
  have produced; the bundle's own ``Orientationd``/``Spacingd`` then do the rest.
- Segmentation outputs come back on the **source grid**: ``labels.shape == volume.array.shape``,
  same ``[i, j, k]`` order, through the bundle's own ``Invertd``.

What is taken from ``inference.json`` (see ``shared/bundles/README.md``):

- honoured: ``network_def``, ``preprocessing`` (orientation, spacing, intensity), ``inferer``,
  ``postprocessing`` (``Activationsd``, ``Invertd``, ``AsDiscreted``), ``modelname`` and every id those
  refer to (``pixdim``, ``displayable_configs#...``).
- replaced: ``LoadImage(d)`` and every ``Save*`` transform by ``Identityd``; ``device`` and
  ``inferer#device`` by the runtime's device; ``network_def#pretrained`` by ``False`` (no downloads).
- computed faster, same values: every ``AsDiscreted(argmax)`` by :func:`pipeline.postprocess.channel_argmax`.
- opt-in per pipeline (they change results a little, so they are part of its identity):
  ``invert_labels`` (:mod:`pipeline.postprocess`) and ``cpu_bf16`` (bfloat16 autocast on CPU).
- bundle-local code (``scripts/``): importable for this bundle only, from the pinned bytes, while it
  is built and run (:mod:`pipeline.bundle_code`).
- removed before parsing, so never resolved: :data:`NEVER_RESOLVED` (data loading, handlers,
  evaluator, checkpoint loader, ``initialize``, ``run``). Weights are loaded here, pinned.

Security: a bundle is code (``_target_`` imports anything, ``$...`` is ``eval``'d). Only a bundle inside
an allowed directory whose :func:`bundle_sha256` equals the pinned digest is parsed, and the bytes
parsed and loaded are the bytes that were hashed (no second read from disk).
"""

from __future__ import annotations

import enum
import json
import pydoc
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bundle_code import BundleCode
from pipeline.bundle_config import INFERENCE, NEVER_RESOLVED, build_parser, load_network
from pipeline.bundle_pins import bundle_sha256, read_pinned
from pipeline.detection import (
    detection_boxes,
    detection_build,
    is_detector_output,
    label_names,
    run_required,
)
from pipeline.errors import BundleError, TransientError
from pipeline.findings import AlgorithmInfo, Detection
from pipeline.multiseries import MultiChannelVolume, check_bundle_channels
from pipeline.postprocess import channel_argmax, faster_postprocessing
from pipeline.volume import Volume

__all__ = ["NEVER_RESOLVED", "BundleKind", "BundleRuntime", "Prediction"]
__all__ += ["bundle_sha256", "clear_bundle_cache", "load_bundle"]

_CACHE_SIZE = 4
# How MONAI transforms say an optional package is missing ("Skimage.measure required.").
_MONAI_REQUIRED = re.compile(r"\b[A-Za-z_][\w.]* required\b")
# What MONAI's ConfigParser raises for a config that does not build (bad id, import, expression).
_BUILD_ERRORS = (KeyError, ValueError, TypeError, AttributeError, ImportError, RuntimeError, SyntaxError)


class BundleKind(enum.Enum):
    """What a bundle's network outputs."""

    SEGMENTATION = "segmentation"  # one value per voxel: (B, C, *spatial)
    CLASSIFICATION = "classification"  # one value per class: (B, C)
    DETECTION = "detection"  # boxes, labels and scores per image (pipeline.detection)


@dataclass(frozen=True, eq=False)
class Prediction:
    """What one bundle concluded about one volume; arrays are read-only.

    ``labels`` is ``[i, j, k]`` on the source grid (same shape as ``volume.array``), holding channel
    indices into ``label_names``. ``probabilities`` is ``[C, i, j, k]`` float32 on the source grid where
    the bundle inverts its probabilities before taking the argmax (spleen does, wholeBody does not:
    then it is ``None``). ``class_probabilities`` is set for classification bundles only.
    """

    kind: BundleKind
    label_names: tuple[str, ...]  # index = output channel
    algorithm: AlgorithmInfo
    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    class_probabilities: tuple[float, ...] | None = None
    # Multi-label (sigmoid) bundles: bool [C, i, j, k], channel c is label_names[c]; channels may overlap.
    masks: np.ndarray | None = None
    # Detection bundles: every box the bundle returned, in LPS, highest score first (pipeline.detection).
    boxes: tuple[Detection, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind is BundleKind.DETECTION and self.boxes is None:
            raise ValueError("a detection Prediction needs boxes (possibly none)")
        if self.kind is BundleKind.SEGMENTATION and self.labels is None and self.masks is None:
            raise ValueError("a segmentation Prediction needs labels or masks")
        if self.kind is BundleKind.CLASSIFICATION and self.class_probabilities is None:
            raise ValueError("a classification Prediction needs class_probabilities")
        if self.masks is not None and self.masks.shape[0] != len(self.label_names):
            raise ValueError(f"{self.masks.shape[0]} mask channels for {len(self.label_names)} label names")
        for array in (self.labels, self.probabilities, self.masks):
            if array is not None:
                array.flags.writeable = False


def _import_error(exc: BaseException | None) -> ImportError | None:
    while exc is not None and not isinstance(exc, ImportError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


# --- the runtime ---------------------------------------------------------------------------------


class BundleRuntime:
    """One loaded, pinned bundle: parser, network, transforms and inferer, kept warm per process.

    Build it with :func:`load_bundle` (cached) or :meth:`load`; call :meth:`predict` per volume.
    """

    def __init__(
        self,
        *,
        path: Path,
        sha256: str,
        device: torch.device,
        amp: bool,
        parser: Any,
        network: torch.nn.Module,
        invert_labels: bool = False,
        cpu_bf16: bool = False,
        code: BundleCode | None = None,
    ) -> None:
        self.code = code or BundleCode({}, str(path))  # bundle-local scripts/, active while built and run
        self.path = path
        self.sha256 = sha256
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.cpu_bf16 = (
            cpu_bf16 and device.type == "cpu"
        )  # bfloat16 autocast on CPU (opt-in: changes results)
        self.parser = parser
        self.network = network
        meta = parser.get("_meta_", {})
        self.label_names = label_names(parser, meta)  # channel_def; a detector may have none
        self.name = str(meta.get("name") or path.name)
        self.version = str(meta.get("version") or "unknown")
        self.image_key = str(parser.get_parsed_content("image_key")) if "image_key" in parser else "image"
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        postprocessing = parser.get_parsed_content("postprocessing") if "postprocessing" in parser else None
        steps = getattr(postprocessing, "transforms", [postprocessing])
        # The exact fast argmax always; labels inverted instead of probabilities when asked (pipeline.postprocess).
        self.postprocessing_steps, self.inverts_labels = faster_postprocessing(
            [s for s in steps if s is not None], invert_labels=invert_labels
        )
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        *,
        sha256: str,
        allowed_dirs: Sequence[str | Path],
        device: str | torch.device | None = None,
        overrides: Mapping[str, Any] | None = None,
        amp: bool = True,
        invert_labels: bool = False,
        cpu_bf16: bool = False,
    ) -> BundleRuntime:
        """Check path and pin, then parse and build; no cache (see :func:`load_bundle`)."""
        path = Path(bundle_dir).resolve()
        roots = [Path(d).resolve() for d in allowed_dirs]
        if not any(path.is_relative_to(root) for root in roots):
            raise BundleError(
                f"bundle {path} is outside the allowed bundle directories "
                f"{[str(r) for r in roots]}; install it under one of them"
            )
        if not path.is_dir():
            raise BundleError(f"bundle directory {path} does not exist")
        files, actual = read_pinned(path, sha256, roots)
        device_ = _resolve_device(device)
        code = BundleCode(files, str(path))
        try:
            with code.active():
                return cls._build(files, path, actual, device_, overrides, amp, invert_labels, cpu_bf16, code)
        except BundleError:
            raise
        except pydoc.ErrorDuringImport as exc:  # how MONAI's locate() reports a module that fails to import
            hint = ""
            if isinstance(exc.value, ModuleNotFoundError):
                hint = f"; install the package {exc.value.name!r} (an optional extra) or fix the bundle"
            raise BundleError(
                f"bundle {path}: importing {exc.filename} failed: {type(exc.value).__name__}: {exc.value}{hint}"
            ) from exc
        except _BUILD_ERRORS as exc:
            raise BundleError(f"bundle {path} ({INFERENCE}) could not be built: {exc}") from exc

    @classmethod
    def _build(
        cls,
        files: Mapping[str, bytes],
        path: Path,
        actual: str,
        device_: torch.device,
        overrides: Mapping[str, Any] | None,
        amp: bool,
        invert_labels: bool,
        cpu_bf16: bool,
        code: BundleCode,
    ) -> BundleRuntime:
        parser = build_parser(files, overrides or {}, device_)
        with detection_build(files):  # pipeline.detection: torchvision stand-ins, evaluator#_requires_
            network = load_network(parser, files, device_)
            run_required(parser, files)
        return cls(
            path=path,
            sha256=actual,
            device=device_,
            amp=amp,
            parser=parser,
            network=network,
            invert_labels=invert_labels,
            cpu_bf16=cpu_bf16,
            code=code,
        )

    def algorithm(self, pipeline: str) -> AlgorithmInfo:
        """The TID 4019 algorithm identification of this bundle for ``pipeline``."""
        return AlgorithmInfo(name=self.name, version=self.version, sha256=self.sha256, pipeline=pipeline)

    def _image(self, volume: Volume) -> Any:
        from monai.data import MetaTensor
        from monai.utils import MetaKeys, SpaceKeys

        # Several series stacked as channels (pipeline.multiseries): channel-first, as LoadImaged
        # makes of a list of files (original_channel_dim 0).
        channel_dim: int | str = "no_channel"
        pixels = volume.array
        if isinstance(volume, MultiChannelVolume):  # in the order and number the bundle declares
            check_bundle_channels(self.parser.get("_meta_", {}), self.image_key, volume, self.name)
            channel_dim, pixels = 0, volume.channels
        array = np.ascontiguousarray(pixels, dtype=np.float32)
        meta = {
            MetaKeys.SPACE: SpaceKeys.LPS,  # DICOM patient space; without it MONAI assumes RAS, silently
            MetaKeys.ORIGINAL_CHANNEL_DIM: channel_dim,
            MetaKeys.SPATIAL_SHAPE: np.asarray(volume.array.shape),
            MetaKeys.ORIGINAL_AFFINE: volume.affine.astype(np.float64),
            "filename_or_obj": volume.series_instance_uid,
        }
        return MetaTensor(
            torch.from_numpy(array), affine=torch.as_tensor(volume.affine, dtype=torch.float64), meta=meta
        )

    def predict(self, volume: Volume, pipeline: str = "") -> Prediction:
        """Run preprocessing, inferer and postprocessing on ``volume``; outputs on its grid."""
        try:
            with self._lock, self.code.active(), torch.no_grad():
                data = self.preprocessing({self.image_key: self._image(volume)})
                # Postprocessing runs on the inference device, as in the bundle's own evaluator.
                image = data[self.image_key] = data[self.image_key].to(self.device)
                batch = torch.as_tensor(image).as_subclass(torch.Tensor).unsqueeze(0)
                with (
                    torch.autocast("cuda", dtype=torch.float16, enabled=self.amp),
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16),
                ):
                    output = self.inferer(batch, self.network)
                if is_detector_output(output):  # boxes, labels, scores (pipeline.detection)
                    return Prediction(
                        kind=BundleKind.DETECTION,
                        label_names=self.label_names,
                        algorithm=self.algorithm(pipeline),
                        boxes=detection_boxes(self, data, output),
                    )
                if not isinstance(output, torch.Tensor):
                    raise BundleError(
                        f"bundle {self.name}: the network returned {type(output).__name__}, not one tensor"
                    )
                data["pred"] = output[0].float()
                if output.ndim == 2 or output[0, 0].numel() == 1:  # (B, C) or globally pooled (B, C, 1, ...)
                    data["pred"] = data["pred"].reshape(-1)
                    return self._classification(data, pipeline)
                return self._segmentation(data, volume, pipeline)
        except torch.cuda.OutOfMemoryError as exc:
            raise TransientError(f"bundle {self.name}: out of GPU memory on {self.device}: {exc}") from exc
        except (ImportError, RuntimeError) as exc:  # MONAI wraps a transform's errors in RuntimeError
            missing = _import_error(exc)
            needed = _MONAI_REQUIRED.search(str(exc)) if missing is None else None
            if needed is not None:  # MONAI's own words for a missing optional package, e.g. scikit-image
                raise BundleError(
                    f"bundle {self.name} needs a package that is not installed: {needed.group(0)} "
                    "(install the bundle's optional extras, e.g. pip install 'pacs-triage[zoo]')"
                ) from exc
            if missing is None:
                raise
            # e.g. Orientationd needs nibabel: a deployment fault, the same on every retry
            raise BundleError(f"bundle {self.name} needs a package that is not installed: {missing}") from exc

    def _classification(self, data: dict[str, Any], pipeline: str) -> Prediction:
        for step in self.postprocessing_steps:
            data = step(data)
        probs = torch.as_tensor(data["pred"]).detach().float().cpu().reshape(-1)
        if probs.numel() != len(self.label_names):
            raise BundleError(
                f"bundle {self.name}: {probs.numel()} outputs but {len(self.label_names)} labels in channel_def"
            )
        if bool(((probs < -1e-6) | (probs > 1 + 1e-6)).any()):
            raise BundleError(
                f"bundle {self.name}: outputs {probs.tolist()} are not probabilities; "
                "end postprocessing with Activationsd(sigmoid or softmax)"
            )
        return Prediction(
            kind=BundleKind.CLASSIFICATION,
            label_names=self.label_names,
            algorithm=self.algorithm(pipeline),
            class_probabilities=tuple(float(p) for p in probs.clamp(0.0, 1.0)),
        )

    def _segmentation(self, data: dict[str, Any], volume: Volume, pipeline: str) -> Prediction:
        shape = tuple(volume.array.shape)
        probabilities: torch.Tensor | None = None

        def source_grid_probabilities(pred: Any) -> bool:
            return (
                isinstance(pred, torch.Tensor)
                and pred.is_floating_point()
                and pred.ndim == 4
                and pred.shape[0] > 1
                and tuple(pred.shape[1:]) == shape
            )

        # Step through postprocessing to keep the last multi-channel map already on the source grid
        # (spleen inverts the softmax, then takes the argmax: that map is the probabilities).
        # A multi-label bundle thresholds its sigmoids (brats: AsDiscreted(threshold=0.5)); the binary
        # channels right after that step are its overlapping masks, whatever a later Lambdad merges.
        for step in self.postprocessing_steps:
            if source_grid_probabilities(data["pred"]):
                probabilities = data["pred"]
            data = step(data)
            pred = data["pred"]
            if _thresholds(step) and isinstance(pred, torch.Tensor) and tuple(pred.shape[1:]) == shape:
                return self._multilabel(data["pred"], probabilities, pipeline)
        pred = torch.as_tensor(data["pred"]).detach()
        if source_grid_probabilities(pred):
            probabilities = pred
            pred = channel_argmax(pred)
        if pred.ndim != 4 or pred.shape[0] != 1 or tuple(pred.shape[1:]) != shape:
            raise BundleError(
                f"bundle {self.name}: postprocessing returned shape {tuple(pred.shape)}, expected "
                f"(1, {', '.join(map(str, shape))}) on the source grid; it needs Invertd after the inferer"
            )
        dtype = np.uint8 if len(self.label_names) <= 256 else np.uint16
        labels = pred[0].round().cpu().numpy().astype(dtype)
        probs_np = None if probabilities is None else probabilities.float().cpu().numpy().astype(np.float32)
        return Prediction(
            kind=BundleKind.SEGMENTATION,
            label_names=self.label_names,
            algorithm=self.algorithm(pipeline),
            labels=labels,
            probabilities=probs_np,
        )

    def _multilabel(
        self, masks: torch.Tensor, probabilities: torch.Tensor | None, pipeline: str
    ) -> Prediction:
        if masks.shape[0] != len(self.label_names):
            raise BundleError(
                f"bundle {self.name}: {masks.shape[0]} thresholded channels but {len(self.label_names)} "
                "labels in channel_def"
            )
        probs_np = None if probabilities is None else probabilities.float().cpu().numpy().astype(np.float32)
        return Prediction(
            kind=BundleKind.SEGMENTATION,
            label_names=self.label_names,
            algorithm=self.algorithm(pipeline),
            masks=masks.detach().cpu().numpy() > 0,
            probabilities=probs_np,
        )


def _thresholds(step: Any) -> bool:
    """Whether ``step`` is an ``AsDiscreted`` that thresholds (multi-label sigmoid), not an argmax."""
    from monai.transforms import AsDiscreted

    if not isinstance(step, AsDiscreted):
        return False
    return any(t is not None for t in step.threshold) and not any(step.argmax)


# --- per-process cache ---------------------------------------------------------------------------

_cache: OrderedDict[tuple[str, str, str, str, bool, bool, bool], BundleRuntime] = OrderedDict()
_cache_lock = threading.Lock()


def load_bundle(
    bundle_dir: str | Path,
    *,
    sha256: str,
    allowed_dirs: Sequence[str | Path],
    device: str | torch.device | None = None,
    overrides: Mapping[str, Any] | None = None,
    amp: bool = True,
    invert_labels: bool = False,
    cpu_bf16: bool = False,
) -> BundleRuntime:
    """Load a pinned bundle once per process; later calls with the same key return the warm runtime.

    The key is (resolved path, pinned sha256, device, overrides, amp, invert_labels, cpu_bf16);
    ``invert_labels`` and ``cpu_bf16`` are the opt-in speed options of :mod:`pipeline.postprocess` and
    bfloat16 autocast on CPU (both change results a little: per pipeline, never by default). ``device`` defaults to CUDA
    when present, else CPU. ``overrides`` maps config ids to values, e.g.
    ``{"displayable_configs#highres": False, "inferer#sw_batch_size": 1}``.
    Raises :class:`BundleError` for a path outside ``allowed_dirs``, a sha256 mismatch, missing weights
    or a config that does not build.
    """
    device_ = _resolve_device(device)
    key = (
        str(Path(bundle_dir).resolve()),
        sha256.strip().lower(),
        str(device_),
        json.dumps(dict(overrides or {}), sort_keys=True, default=repr),
        amp,
        invert_labels,
        cpu_bf16,
    )
    with _cache_lock:
        runtime = _cache.get(key)
        if runtime is not None:
            _cache.move_to_end(key)
            return runtime
        runtime = BundleRuntime.load(
            bundle_dir,
            sha256=sha256,
            allowed_dirs=allowed_dirs,
            device=device_,
            overrides=overrides,
            amp=amp,
            invert_labels=invert_labels,
            cpu_bf16=cpu_bf16,
        )
        _cache[key] = runtime
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return runtime


def clear_bundle_cache() -> None:
    """Forget every loaded bundle (tests; a worker reloading its configuration)."""
    with _cache_lock:
        _cache.clear()
