"""The configuration files of the demo bundles: ``configs/inference.json`` and ``configs/metadata.json``.

Both bundles are configured like ``spleen_ct_segmentation`` (see :mod:`pipeline.demo.training`, which
trains them and writes these files), so the generic bundle runtime runs them unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from pipeline.bundle_runtime import BundleKind

__all__ = ["HU_WINDOW", "SEG_SPACING", "SEG_WINDOW", "build_network", "cls_config", "metadata", "seg_config"]

HU_WINDOW = (-60.0, 160.0)
SEG_SPACING = (1.25, 1.25, 2.5)
SEG_WINDOW = (160, 160, 64)  # sliding-window size in voxels of SEG_SPACING


def _preprocessing(spacing: tuple[float, ...], extra: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            # float32: MONAI resamples in float64 unless told, which doubles the memory of Spacingd and
            # of its inverse in Invertd (300 slices: peak 6.1 -> 3.5 GiB); the labels are the same
            # (tests/pipeline/test_postprocess.py). Training resamples its patches in float64.
            {
                "_target_": "Spacingd",
                "keys": "@image_key",
                "pixdim": list(spacing),
                "mode": "bilinear",
                "dtype": "$torch.float32",
            },
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": HU_WINDOW[0],
                "a_max": HU_WINDOW[1],
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },  # fmt: skip
            {
                "_target_": "CropForegroundd",
                "keys": "@image_key",
                "source_key": "@image_key",
                "allow_smaller": True,
            },
            *extra,
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ],
    }


def _common(network_def: Any) -> dict[str, Any]:
    return {
        "imports": ["$import numpy"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
    }


def seg_config() -> dict[str, Any]:
    """``lesion_seg/configs/inference.json``."""
    unet = _unet()
    return {
        **_common(unet),
        "preprocessing": _preprocessing(SEG_SPACING, []),
        # Windows of 200 x 200 x 160 mm overlapping by half: every voxel lies in the central half of a
        # window, 50 mm (40 in z) from its edges, which holds the largest lesion. The network's output
        # fades near a window edge: with 96 x 96 x 32 and overlap 0.25 a lesion cut by an edge came out
        # up to 60 % too small (issue 13 item 8).
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(SEG_WINDOW),
            "sw_batch_size": 1,
            "overlap": 0.5,
            "mode": "gaussian",
        },  # fmt: skip
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "@image_key",
                    "nearest_interp": False,
                    "to_tensor": True,
                },  # fmt: skip
                {"_target_": "CopyItemsd", "keys": "pred", "times": 1, "names": "pred_prob"},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "separate_folder": True,
                },  # fmt: skip
            ],
        },
    }


def _unet() -> dict[str, Any]:
    return {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128],
            "strides": [2, 2, 2], "num_res_units": 1, "norm": "batch"}  # fmt: skip


def cls_config() -> dict[str, Any]:
    """``lesion_cls/configs/inference.json``: the segmentation UNet, then a pooling head to (background, lesion)."""
    # A 6 x 6 x 3 voxel cube (7.5 mm) fits inside a 1 mL sphere: its mean lesion probability is ~1 for a
    # lesion of 1 mL or more and small for specks, so the maximum over cubes scores "a lesion >= ~1 mL".
    head = "torch.nn.Softmax(dim=1), torch.nn.AvgPool3d([6, 6, 3], stride=1), torch.nn.AdaptiveMaxPool3d(1)"
    return {
        **_common(f"$torch.nn.Sequential(@backbone_def, {head}, torch.nn.Flatten())"),
        "backbone_def": _unet(),
        "preprocessing": _preprocessing(
            SEG_SPACING, [{"_target_": "DivisiblePadd", "keys": "@image_key", "k": 8}]
        ),
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [{"_target_": "Identityd", "keys": "pred"}]},
    }


def metadata(kind: BundleKind) -> dict[str, Any]:
    """``configs/metadata.json`` of the segmentation or the classification bundle."""
    seg = kind is BundleKind.SEGMENTATION
    output = (
        {"type": "image", "format": "segmentation", "num_channels": 2, "spatial_shape": [96, 96, 32], "dtype": "float32",
         "value_range": [0, 1], "is_patch_data": True, "channel_def": {"0": "background", "1": "lesion"}}
        if seg else
        {"type": "probabilities", "format": "classification", "num_channels": 2, "spatial_shape": [2],
         "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
         "channel_def": {"0": "background (max. mean probability in a 7.5 mm cube)", "1": "lesion present"}}
    )  # fmt: skip
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "first demo bundle, trained on pacs-triage phantoms"},
        "monai_version": "1.6.1",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "name": f"Phantom liver lesion {'segmentation' if seg else 'classification'} (demo)",
        "task": "Liver lesion segmentation in CT" if seg else "Liver lesion presence in CT",
        "description": "Trained only on synthetic phantoms by pipeline.demo.training; a pipeline demo, not a clinical model.",
        "authors": "pacs-triage developers",
        "copyright": "Copyright (c) pacs-triage developers",
        "intended_use": "This is an example, not to be used for diagnostic purposes",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [96, 96, 32] if seg else ["8*n", "8*n", "8*n"],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": seg,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {"pred": output},
        },  # fmt: skip
    }


def build_network(config: dict[str, Any]) -> torch.nn.Module:
    """The ``network_def`` of a bundle config."""
    parser = ConfigParser(config)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, torch.nn.Module)
    return net
