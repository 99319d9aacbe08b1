"""Detection bundles (lung_nodule_ct_detection: ``RetinaNet`` + ``RetinaNetDetector``): boxes in LPS.

What :class:`~pipeline.bundle_runtime.BundleRuntime` does for a detection bundle, on top of what it
does for every bundle (``shared/bundles/README.md``):

- **build**: MONAI's two torchvision helpers are stood in for while the network is built
  (:mod:`pipeline.detection_compat`); after the network is built and before the inferer, the ids the
  bundle's evaluator requires (``evaluator#_requires_``: lung nodule's ``detector_ops``, which set the
  detector's keys, its box selector — score threshold 0.02, NMS, at most 300 boxes — and its
  sliding-window inferer on the CPU) are evaluated, as the bundle's own evaluator would, since the
  evaluator itself is never resolved (:data:`pipeline.bundle_config.NEVER_RESOLVED`).
- **predict**: the inferer returns one dict per image (box ``N x 6`` in the preprocessed image's voxel
  coordinates, labels, scores). The bundle's own postprocessing runs on it with the preprocessed image
  as its reference, exactly as its ``DetectionSaver`` handler would (``ClipBoxToImaged``,
  ``AffineBoxToWorldCoordinated``, ``ConvertBoxModed``, ``DeleteItemsd``); only the JSON file it
  would save is replaced by :class:`~pipeline.findings.Detection` values.
- **world coordinates**: ``AffineBoxToWorldCoordinated`` maps a box through the reference image's affine,
  which is in the image's ``meta["space"]`` (LPS here: the runtime feeds DICOM's LPS affine), and with
  ``affine_lps_to_ras=True`` flips x and y first. So the bundle's boxes come out in RAS for our input
  (in LPS for its own NIfTI loader, whose affine is RAS: that is what LUNA16's world coordinates are).
  :func:`boxes_lps` reads the space and the flag from the transforms that ran and turns every box
  into an LPS ``(x0, y0, z0, x1, y1, z1)``. MONAI's world box (``apply_affine_to_boxes``) is the bounding
  box of the two transformed corners ``(x0, y0, z0)`` and ``(x1, y1, z1)``: exact when the grid's axes
  run along the patient's (any axial, sagittal or coronal series), too small on an oblique grid (a
  square box turned 45 degrees collapses to zero width). The box reported is therefore the bounding box
  of all eight corners of the image-space box that ``AffineBoxToWorldCoordinated`` received, through
  the same affine; it contains the detection on any grid and equals MONAI's on an axis-aligned one.
- **labels**: ``channel_def`` of ``network_data_format.outputs.pred`` when the metadata has one (an
  override of ``_meta_#network_data_format#outputs#pred#channel_def`` can name them, e.g.
  ``{"0": "nodule"}``); otherwise a one-class detector's class is ``"lesion"`` and several are
  ``"class 0"``, ``"class 1"``, ...
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch

from pipeline.bundle_config import INFERENCE, NEVER_RESOLVED, channel_names
from pipeline.errors import BundleError
from pipeline.findings import Detection


class DetectorRuntime(Protocol):
    """What of :class:`~pipeline.bundle_runtime.BundleRuntime` the detection code uses."""

    name: str
    image_key: str
    label_names: tuple[str, ...]
    inferer: Any
    postprocessing_steps: list[Any]


__all__ = [
    "DEFAULT_BOX_KEYS",
    "boxes_lps",
    "detection_build",
    "DetectorRuntime",
    "detection_boxes",
    "is_detection_bundle",
    "is_detector_output",
    "label_names",
    "run_required",
    "score_threshold",
]

#: (box, label, score) keys of a RetinaNetDetector's output unless it says otherwise (``set_target_keys``).
DEFAULT_BOX_KEYS = ("box", "label", "label_scores")
_MARKERS = ("monai.apps.detection", "RetinaNet")  # how inference.json shows a detection bundle


def is_detection_bundle(files: Mapping[str, bytes]) -> bool:
    """Whether ``inference.json`` builds a MONAI detector (its torchvision stand-ins are then needed)."""
    text = files.get(INFERENCE, b"").decode("utf-8", errors="replace")
    return any(marker in text for marker in _MARKERS)


def run_required(parser: Any, files: Mapping[str, bytes]) -> None:
    """Evaluate the ids ``evaluator#_requires_`` names (lung nodule: ``@detector_ops``), in order.

    The evaluator is never built here, but what it requires before it runs sets up the inferer;
    ids the runtime never resolves are skipped. Call after the network is built, before the inferer.
    Only for detection bundles (:func:`is_detection_bundle`); other bundles are left as they were.
    """
    if not is_detection_bundle(files):
        return
    try:
        evaluator = json.loads(files[INFERENCE]).get("evaluator")
    except (KeyError, ValueError, AttributeError):
        return
    requires = evaluator.get("_requires_") if isinstance(evaluator, dict) else None
    refs = [requires] if isinstance(requires, str) else requires if isinstance(requires, list) else []
    for ref in refs:
        if not isinstance(ref, str) or not ref.startswith("@"):
            continue
        ref_id = ref[1:]
        if ref_id.split("#", 1)[0] in NEVER_RESOLVED or ref_id not in parser:
            continue
        parser.get_parsed_content(ref_id)


@contextlib.contextmanager
def detection_build(files: Mapping[str, bytes]) -> Iterator[None]:
    """While building a detection bundle: MONAI's torchvision helpers stood in for; else nothing."""
    if not is_detection_bundle(files):
        yield
        return
    from pipeline.detection_compat import torchvision_stand_ins

    with torchvision_stand_ins():
        yield


def label_names(parser: Any, meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The output names of any bundle: ``channel_def``; for a detector without one, by class count."""
    try:
        return channel_names(meta)
    except BundleError:
        if "detector" not in parser and "RetinaNet" not in json.dumps(parser.get("network_def"), default=str):
            raise
    count = parser.get_parsed_content("num_classes") if "num_classes" in parser else 1
    if not isinstance(count, int) or count < 1:
        raise BundleError(f"num_classes of a detection bundle must be a positive integer, got {count!r}")
    return ("lesion",) if count == 1 else tuple(f"class {n}" for n in range(count))


def is_detector_output(output: Any) -> bool:
    """A detector's output: one dict of tensors per image (RetinaNetDetector in inference mode)."""
    return isinstance(output, list | tuple) and bool(output) and all(isinstance(o, dict) for o in output)


def _keys(inferer: Any) -> tuple[str, str, str]:
    detector = getattr(inferer, "detector", None)
    box, label, score = (
        getattr(detector, name, default)
        for name, default in zip(
            ("target_box_key", "target_label_key", "pred_score_key"), DEFAULT_BOX_KEYS, strict=True
        )
    )
    return str(box), str(label), str(score)


def boxes_lps(
    item: dict[str, Any], steps: Sequence[Any], image_key: str, box_key: str = "box"
) -> tuple[dict[str, Any], np.ndarray]:
    """Run the bundle's postprocessing ``steps`` on one detector output ``item``; boxes as LPS corners.

    ``item`` holds the detector's outputs and, at ``image_key``, the preprocessed image (a
    ``MetaTensor``) they refer to. Returns the postprocessed item and its boxes as an ``N x 6`` float64
    array ``(x0, y0, z0, x1, y1, z1)`` in LPS mm (module docstring: how the space is known).
    """
    from monai.apps.detection.transforms.dictionary import AffineBoxToWorldCoordinated, ConvertBoxModed
    from monai.data.box_utils import StandardMode, convert_box_mode
    from monai.utils import MetaKeys, SpaceKeys

    image = item[image_key]
    meta = getattr(image, "meta", {})
    image_space = str(meta.get(MetaKeys.SPACE, SpaceKeys.RAS)).upper()
    world: str | None = None  # the space the boxes are in once in world coordinates
    mode: Any = StandardMode
    voxel_boxes: np.ndarray | None = None  # what AffineBoxToWorldCoordinated received (image space)
    to_world: np.ndarray | None = None  # and the affine it applied
    for step in steps:
        if isinstance(step, AffineBoxToWorldCoordinated):
            voxel_boxes = _as_boxes(item[box_key])
            reference = cast(Mapping[Hashable, Any], item)
            to_world = np.asarray(torch.as_tensor(step.extract_affine(reference)[0]).cpu(), dtype=np.float64)
        item = step(item)
        if isinstance(step, AffineBoxToWorldCoordinated):
            flipped = {"LPS": "RAS", "RAS": "LPS"}[image_space]
            world = flipped if step.affine_lps_to_ras else image_space
        if isinstance(step, ConvertBoxModed):
            mode = step.converter.dst_mode
    raw = torch.as_tensor(item[box_key]).detach().cpu().to(torch.float64).reshape(-1, 6)
    boxes: Any = convert_box_mode(raw, src_mode=mode, dst_mode=StandardMode)
    if world is None:  # still in voxel coordinates of the preprocessed image: map them ourselves
        voxel_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
        to_world = np.asarray(torch.as_tensor(image.affine).cpu(), dtype=np.float64)
        world = image_space
    if voxel_boxes is not None and to_world is not None and len(voxel_boxes) == len(raw):
        boxes = _world_bounding_boxes(voxel_boxes, to_world)  # all eight corners (module docstring)
    corners = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    if world == "RAS":  # RAS -> LPS: x and y change sign, so their low and high corners swap
        corners = corners.copy()
        for lo, hi in ((0, 3), (1, 4)):
            corners[:, lo], corners[:, hi] = -corners[:, hi].copy(), -corners[:, lo].copy()
    return item, corners


def _as_boxes(boxes: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(boxes).detach().cpu().to(torch.float64), dtype=np.float64).reshape(
        -1, 6
    )


def _world_bounding_boxes(voxel_boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``N x 6`` xyzxyz boxes in image space -> the bounding boxes of their eight corners through ``affine``."""
    lo, hi = voxel_boxes[:, None, :3], voxel_boxes[:, None, 3:]
    pick = np.array([[(n >> a) & 1 for a in range(3)] for n in range(8)], dtype=bool)  # 8 x 3 corner choice
    corners = np.where(pick[None], hi, lo)  # N x 8 x 3
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return np.concatenate([world.min(axis=1), world.max(axis=1)], axis=1)


def detection_boxes(runtime: DetectorRuntime, data: dict[str, Any], output: Any) -> tuple[Detection, ...]:
    """The boxes of a detector's ``output`` for one image, in LPS, highest score first.

    ``data[runtime.image_key]`` is the preprocessed image the boxes refer to. None are dropped here
    (the pipeline's :class:`~pipeline.detection_findings.DetectionOptions` do that).
    """
    if len(output) != 1:
        raise BundleError(f"bundle {runtime.name}: the detector returned {len(output)} results for one image")
    box_key, label_key, score_key = _keys(runtime.inferer)
    item = {**output[0], runtime.image_key: data[runtime.image_key]}
    missing = [k for k in (box_key, label_key, score_key) if k not in item]
    if missing:
        raise BundleError(
            f"bundle {runtime.name}: the detector's output has no {missing} (keys {sorted(item)})"
        )
    item, corners = boxes_lps(item, runtime.postprocessing_steps, runtime.image_key, box_key)
    labels = torch.as_tensor(item[label_key]).detach().cpu().reshape(-1).long().tolist()
    scores = torch.as_tensor(item[score_key]).detach().cpu().reshape(-1).float().tolist()
    if not len(labels) == len(scores) == len(corners):
        raise BundleError(
            f"bundle {runtime.name}: {len(corners)} boxes, {len(labels)} labels and {len(scores)} scores"
        )
    names = runtime.label_names
    boxes = []
    for label, score, box in zip(labels, scores, corners, strict=True):
        if not 0 <= label < len(names):
            raise BundleError(f"bundle {runtime.name}: box label {label} outside its {len(names)} classes")
        if not np.all(np.isfinite(box)):
            continue
        boxes.append(
            Detection(
                label=label,
                name=names[label],
                score=float(min(max(score, 0.0), 1.0)),
                box_lps=(*(float(v) for v in box),),  # type: ignore[arg-type]
            )
        )
    boxes.sort(key=lambda d: -d.score)
    return tuple(boxes)


def score_threshold(runtime: DetectorRuntime) -> float | None:
    """The bundle's own score threshold (its box selector's ``score_thresh``), when it has one."""
    detector = getattr(runtime.inferer, "detector", None)
    selector = getattr(detector, "box_selector", None)
    value = getattr(selector, "score_thresh", None)
    return float(value) if isinstance(value, int | float) else None
