"""Where a classifier looked: MONAI Grad-CAM of a classification bundle, on the source grid.

``saliency_map(runtime, volume)`` runs the bundle's preprocessing, computes Grad-CAM
(:class:`monai.visualize.GradCAM`) on the network's last ``Conv3d`` for the most probable
non-background class ("lesion present"; largest
value -> 1, not MONAI's default flipped scale), and maps the map back to the volume's ``[i, j, k]`` grid
through the inverse of the bundle's own preprocessing (the same inversion ``Invertd`` does for a
segmentation: padding, crop and resampling undone). Values are in [0, 1] (Grad-CAM normalises).

It is for the key images' optional overlay (issue 13 item 10): a picture for people, not a
measurement. Pure: no clock, no I/O; the bundle's lock is held while the network runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.bundle_runtime import BundleRuntime
from pipeline.errors import BundleError
from pipeline.volume import Volume

__all__ = ["last_conv3d", "saliency_map"]


def last_conv3d(network: torch.nn.Module) -> str:
    """The dotted name of the last ``Conv3d`` of ``network`` (module order), for Grad-CAM's target layer."""
    names = [name for name, module in network.named_modules() if isinstance(module, torch.nn.Conv3d)]
    if not names:
        raise BundleError("the classifier has no Conv3d layer: Grad-CAM saliency needs one")
    return names[-1]


def _unit_range(cam: torch.Tensor) -> torch.Tensor:
    """Each map of the batch scaled linearly from its (min, max) to (0, 1); a flat map becomes 0."""
    flat = cam.detach().flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (cam.ndim - 1)))
    span = (flat.max(dim=1).values.view_as(low) - low).clamp_min(1e-12)
    return ((cam.detach() - low) / span).clamp(0.0, 1.0)


def saliency_map(runtime: BundleRuntime, volume: Volume) -> np.ndarray:
    """Grad-CAM of ``runtime`` (a classification bundle) on ``volume``'s grid ([i, j, k], float32 in [0, 1])."""
    from monai.data import MetaTensor
    from monai.visualize import GradCAM

    layer = last_conv3d(runtime.network)
    with runtime._lock, runtime.code.active():
        data = runtime.preprocessing({runtime.image_key: runtime._image(volume)})
        image = data[runtime.image_key]
        batch = torch.as_tensor(image).as_subclass(torch.Tensor).unsqueeze(0).to(runtime.device)
        was_training = runtime.network.training
        runtime.network.eval()
        try:
            with torch.enable_grad():
                with torch.no_grad():
                    probs = runtime.network(batch).float().reshape(-1)
                class_index = 1 + int(torch.argmax(probs[1:])) if probs.numel() > 1 else 0
                # MONAI's default normaliser flips the map (largest -> 0): scale it here instead, largest -> 1.
                cam = GradCAM(nn_module=runtime.network, target_layers=layer, postprocessing=_unit_range)
                heat = cam(x=batch, class_idx=class_index)  # (1, 1, *spatial), upsampled to the input
        finally:
            runtime.network.train(was_training)
        heat_meta: Any = MetaTensor(heat[0].detach().float().cpu(), meta=dict(image.meta))
        heat_meta.applied_operations = list(image.applied_operations)
        inverted = runtime.preprocessing.inverse({runtime.image_key: heat_meta})[runtime.image_key]
    array = np.asarray(torch.as_tensor(inverted).detach().cpu().numpy(), dtype=np.float32)
    array = array.reshape(array.shape[-3:]) if array.ndim == 4 else array
    if array.shape != volume.array.shape:
        raise BundleError(
            f"bundle {runtime.name}: the saliency map came back as {array.shape}, not the volume's "
            f"{volume.array.shape}: its preprocessing cannot be inverted"
        )
    return np.clip(np.nan_to_num(array), 0.0, 1.0)
