"""Reading a pinned bundle's configuration: ``inference.json`` parsed with its file I/O replaced, the
label names from ``metadata.json``, and the network with its pinned weights.

Everything here works on the bytes :func:`pipeline.bundle_pins.read_pinned` returned, never on the
files on disk. What is honoured, replaced and removed is listed in :mod:`pipeline.bundle_runtime`.
"""

from __future__ import annotations

import inspect
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import BundleError

__all__ = ["INFERENCE", "METADATA", "NEVER_RESOLVED", "build_parser", "channel_names", "load_network"]

#: Top-level ids of ``inference.json`` dropped before parsing: the daemon feeds data, loads weights
#: and drives inference itself. Anything that still refers to them fails with a BundleError.
NEVER_RESOLVED: tuple[str, ...] = (
    *("datalist", "dataset", "dataloader", "data", "test_imagelist", "test_labellist", "handlers"),
    *("evaluator", "checkpointloader", "initialize", "run", "evaluating", "finalize"),
)
INFERENCE = "configs/inference.json"
METADATA = "configs/metadata.json"
_DEFAULT_WEIGHTS = ("model.pt", "model.ts")
_FILE_MACRO = re.compile(r'"%[^"#]*\.(json|ya?ml)[#"]')  # "%other.json#id" reads an unpinned file


def _target_name(item: object) -> str:
    target = item.get("_target_") if isinstance(item, dict) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _json(files: Mapping[str, bytes], rel: str) -> dict[str, Any]:
    try:
        content = json.loads(files[rel])
    except KeyError:
        raise BundleError(f"bundle has no {rel}") from None
    except ValueError as exc:
        raise BundleError(f"{rel} is not valid JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise BundleError(f"{rel} must hold a JSON object")
    return content


def channel_names(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """Channel names from ``network_data_format.outputs.pred.channel_def`` (or the only output)."""
    outputs = meta.get("network_data_format", {}).get("outputs", {})
    output = outputs.get("pred") or (next(iter(outputs.values())) if len(outputs) == 1 else None)
    channel_def = output.get("channel_def") if isinstance(output, dict) else None
    if not isinstance(channel_def, dict) or not channel_def:
        raise BundleError(f"{METADATA} has no network_data_format.outputs.pred.channel_def naming the labels")
    try:
        by_index = {int(k): str(v) for k, v in channel_def.items()}
    except ValueError as exc:
        raise BundleError(f"{METADATA}: channel_def keys must be channel indices: {exc}") from exc
    if sorted(by_index) != list(range(len(by_index))):
        raise BundleError(f"{METADATA}: channel_def indices must be 0..C-1, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _replace_io(parser: Any, section: str, names: tuple[str, ...], prefix: str = "") -> None:
    """Replace the file loaders/writers of ``section#transforms`` by ``Identityd`` on the same keys."""
    transforms = parser.get(f"{section}#transforms")
    if not isinstance(transforms, list):
        return
    for index, item in enumerate(transforms):
        name = _target_name(item)
        if name in names or (prefix and name.startswith(prefix)):
            parser[f"{section}#transforms#{index}"] = {"_target_": "Identityd", "keys": item.get("keys")}


def build_parser(files: Mapping[str, bytes], overrides: Mapping[str, Any], device: torch.device) -> Any:
    from monai.bundle import ConfigParser

    config = _json(files, INFERENCE)
    for key in NEVER_RESOLVED:
        config.pop(key, None)
    macro = _FILE_MACRO.search(json.dumps(config))
    if macro:
        raise BundleError(
            f"{INFERENCE}: macro {macro.group(0)} reads another file; only same-file macros are allowed"
        )
    parser = ConfigParser()
    parser.read_meta(_json(files, METADATA))
    parser.read_config(config)
    for key, value in overrides.items():
        try:
            parser[key] = value
        except (KeyError, IndexError, ValueError) as exc:
            raise BundleError(f"override {key!r}: no such id in {INFERENCE} ({exc})") from exc
    parser["device"] = device
    if isinstance(parser.get("inferer"), dict) and "device" in parser["inferer"]:
        parser["inferer#device"] = device
    if isinstance(parser.get("network_def"), dict) and "pretrained" in parser["network_def"]:
        parser["network_def#pretrained"] = False
    _drop_removed_arguments(parser)
    _replace_io(parser, "preprocessing", ("LoadImaged", "LoadImage"))
    _replace_io(parser, "postprocessing", (), prefix="Save")
    return parser


#: Network arguments that MONAI deprecated as unused and later removed: (class name, argument).
#: Bundles written for older MONAI still pass them (swin_unetr_btcv: ``SwinUNETR(img_size=96)``,
#: unused since MONAI 1.3, removed in 1.5); they are dropped when the installed class has no such
#: parameter, so the bundle runs unchanged and computes the same.
REMOVED_UNUSED_ARGUMENTS: tuple[tuple[str, str], ...] = (("SwinUNETR", "img_size"),)


def _drop_removed_arguments(parser: Any) -> None:
    network_def = parser.get("network_def")
    name = _target_name(network_def)
    if not isinstance(network_def, dict):
        return
    for cls_name, argument in REMOVED_UNUSED_ARGUMENTS:
        if name != cls_name or argument not in network_def:
            continue
        from monai.utils import optional_import

        target, found = optional_import("monai.networks.nets", name=cls_name)
        if found and argument not in inspect.signature(target).parameters:
            parser["network_def"] = {k: v for k, v in network_def.items() if k != argument}


def load_network(parser: Any, files: Mapping[str, bytes], device: torch.device) -> torch.nn.Module:
    """The network with the pinned weights, on ``device``, in eval mode."""
    if "modelname" in parser:
        name = parser.get_parsed_content("modelname")
        if not isinstance(name, str) or Path(name).name != name:
            raise BundleError(f"modelname must be a file name in models/, got {name!r}")
        candidates: tuple[str, ...] = (name,)
    else:
        candidates = _DEFAULT_WEIGHTS
    found = [f"models/{n}" for n in candidates if f"models/{n}" in files]
    if not found:
        raise BundleError(f"bundle has no weights: none of {['models/' + n for n in candidates]} exists")
    rel = found[0]
    data = io.BytesIO(files[rel])
    if rel.endswith(".ts"):
        try:
            network: torch.nn.Module = torch.jit.load(data, map_location=device)
        except RuntimeError as exc:
            raise BundleError(f"{rel} is not a TorchScript module: {exc}") from exc
        return network.eval()
    network = parser.get_parsed_content("network_def")
    if not isinstance(network, torch.nn.Module):
        raise BundleError(f"network_def built a {type(network).__name__}, not a torch.nn.Module")
    try:
        state = torch.load(data, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and len(state) == 1 and isinstance(state.get("model"), dict):
            state = state["model"]  # a CheckpointSaver file with load_dict {"model": ...}
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{rel} does not hold a state dict for network_def: {exc}") from exc
    return network.to(device).eval()
