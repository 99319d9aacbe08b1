"""The two torchvision helpers that ``monai.apps.detection`` needs to *build* a RetinaNet, without torchvision.

MONAI's detection networks borrow two small pieces of torchvision (MONAI 1.6.1, found by grepping
``monai/apps/detection`` and the blocks it uses for ``torchvision``):

- ``monai.apps.detection.networks.retinanet_network._validate_trainable_layers``, an
  ``optional_import("torchvision.models.detection.backbone_utils", name="_validate_trainable_layers")``,
  called by ``resnet_fpn_feature_extractor`` (lung_nodule_ct_detection's ``feature_extractor``);
- ``monai.networks.blocks.backbone_fpn_utils.torchvision_models``, an
  ``optional_import("torchvision.models")`` whose ``_utils.IntermediateLayerGetter`` wraps the
  ResNet backbone in ``BackboneWithFPN``.

MONAI has no internal fallback for either: without torchvision both are placeholders that raise
``OptionalImportError`` when used. The only other torchvision names it imports
(``Matcher``, ``BalancedPositiveNegativeSampler`` in ``retinanet_detector``) serve training and are
not needed to infer. torchvision itself cannot be installed here: PyPI's build for our torch
(2.13) is a CUDA build whose compiled ops do not load against the CPU torch.

So, only while a bundle is being built (:func:`torchvision_stand_ins`), and only where the
placeholder is there (a real torchvision, when installed, is always used instead), those two
module attributes are set to the faithful re-implementations below and restored afterwards.
Nothing is put in ``sys.modules``: ``import torchvision`` still fails, so a bundle that needs more
of torchvision (breast_density_classification's ``TorchVisionFCModel``) still gets MONAI's own
error naming it. The re-implementations follow torchvision 0.19 (BSD-3-Clause,
``torchvision/models/_utils.py`` and ``torchvision/models/detection/backbone_utils.py``), so the
module names, and therefore the state-dict keys of a zoo checkpoint, are the same.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

__all__ = ["IntermediateLayerGetter", "torchvision_stand_ins", "validate_trainable_layers"]

_lock = threading.RLock()


def validate_trainable_layers(
    is_trained: bool, trainable_backbone_layers: int | None, max_value: int, default_value: int
) -> int:
    """torchvision's ``_validate_trainable_layers``: how many backbone layers stay trainable.

    An untrained backbone trains all (``max_value``); a trained one ``default_value`` unless given.
    """
    if not is_trained:
        if trainable_backbone_layers is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if neither pretrained nor "
                f"pretrained_backbone have been set to True, falling back to trainable_backbone_layers={max_value} "
                "so that all layers are trainable",
                stacklevel=2,
            )
        trainable_backbone_layers = max_value
    if trainable_backbone_layers is None:
        trainable_backbone_layers = default_value
    if trainable_backbone_layers < 0 or trainable_backbone_layers > max_value:
        raise ValueError(
            f"Trainable backbone layers should be in the range [0,{max_value}], got {trainable_backbone_layers} "
        )
    return trainable_backbone_layers


class IntermediateLayerGetter(nn.ModuleDict):
    """torchvision's ``IntermediateLayerGetter``: the model's children up to the last returned layer.

    ``forward`` returns an ordered dict ``{return_layers[name]: output of child name}``. The children
    keep their names, so state dicts match torchvision's.
    """

    _version = 2

    def __init__(self, model: nn.Module, return_layers: Mapping[str, str]) -> None:
        if not set(return_layers).issubset([name for name, _ in model.named_children()]):
            raise ValueError("return_layers are not present in model")
        orig_return_layers = dict(return_layers)
        remaining = {str(k): str(v) for k, v in return_layers.items()}
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            remaining.pop(name, None)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = orig_return_layers

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _missing(value: Any) -> bool:
    """Whether ``value`` is MONAI's placeholder for an optional import that failed."""
    return type(value).__name__ == "_LazyRaise"


@contextlib.contextmanager
def torchvision_stand_ins() -> Iterator[None]:
    """Within the block, MONAI's two torchvision placeholders (module docstring) are the stand-ins."""
    from monai.apps.detection.networks import retinanet_network
    from monai.networks.blocks import backbone_fpn_utils

    with _lock:
        saved: list[tuple[Any, str, Any]] = []
        if _missing(retinanet_network._validate_trainable_layers):
            saved.append((retinanet_network, "_validate_trainable_layers", validate_trainable_layers))
        if _missing(backbone_fpn_utils.torchvision_models):
            models = SimpleNamespace(_utils=SimpleNamespace(IntermediateLayerGetter=IntermediateLayerGetter))
            saved.append((backbone_fpn_utils, "torchvision_models", models))
        originals = [(module, name, getattr(module, name)) for module, name, _ in saved]
        try:
            for module, name, stand_in in saved:
                setattr(module, name, stand_in)
            yield
        finally:
            for module, name, original in originals:
                setattr(module, name, original)
