"""What the runtime will do with a bundle, before it is deployed: which parts of ``inference.json`` it
honours, replaces or removes, what the metadata declares, the weights' own hashes, and a copy of the
bundle with random weights (to try a bundle whose weights are not here, as the Model Zoo ships them).

Reading and listing only; building the network (for random weights) evaluates the bundle's config,
which is code: do it only on a bundle the operator chose to check.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bundle_config import INFERENCE, METADATA, NEVER_RESOLVED, channel_names
from pipeline.errors import BundleError

__all__ = [
    "BundleItem",
    "BundleSummary",
    "ChannelRule",
    "WeightHash",
    "channel_rules",
    "describe_bundle",
    "input_channels",
    "random_weights_copy",
    "weight_hashes",
]

_LOADERS = ("LoadImaged", "LoadImage")


@dataclass(frozen=True)
class BundleItem:
    """One id of ``inference.json`` and what the runtime does with it."""

    id: str
    action: str  # "honoured", "replaced", "removed", "overridden", "not used", "disabled"
    detail: str


@dataclass(frozen=True)
class BundleSummary:
    """The bundle's declarations and the runtime's treatment of each part."""

    name: str
    version: str
    monai_version: str
    declared_packages: Mapping[str, str]
    labels: tuple[str, ...]
    input_modality: str
    intended_use: str
    items: tuple[BundleItem, ...]
    kind: str = "segmentation"  # what it outputs (pipeline.bundle_runtime.BundleKind value): declared_kind
    num_channels: int = 1  # network_data_format.inputs.image.num_channels
    # The input channels' names in order (channel_def) when it names num_channels > 1 of them: one
    # series each (pipeline.multiseries); empty for a single-series bundle (e.g. one RGB image).
    input_channels: tuple[str, ...] = ()

    @property
    def multiseries(self) -> bool:
        """Whether the bundle takes several series of a study, one per input channel."""
        return len(self.input_channels) > 1


def input_channels(meta: Mapping[str, Any], image_key: str = "image") -> tuple[int, tuple[str, ...]]:
    """``(num_channels, names)`` of the input ``metadata.json`` declares; ``names`` from ``channel_def``
    in index order when it names every channel (brats: 4, T1c T1 T2 FLAIR), else ``()``: a bundle
    whose ``channel_def`` names fewer (breast density: 3 channels, "image") takes one image."""
    network = meta.get("network_data_format", {})
    inputs = network.get("inputs", {}) if isinstance(network, Mapping) else {}
    image = inputs.get(image_key) if isinstance(inputs, Mapping) else None
    if not isinstance(image, Mapping):
        return 1, ()
    count = image.get("num_channels", 1)
    count = count if isinstance(count, int) and count >= 1 else 1
    channel_def = image.get("channel_def")
    if count < 2 or not isinstance(channel_def, Mapping) or len(channel_def) != count:
        return count, ()
    try:
        by_index = {int(k): str(v).strip() for k, v in channel_def.items()}
    except ValueError:
        return count, ()
    names = tuple(by_index.get(i, "") for i in range(count))
    if not all(names) or len({n.casefold() for n in names}) != count:
        return count, ()
    return count, names


def declared_kind(meta: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """``"detection"``, ``"classification"`` or ``"segmentation"``, from what the bundle declares.

    Detection: ``inference.json`` builds a MONAI detector (:func:`pipeline.detection.is_detection_bundle`)
    or ``pred`` is an ``object``; classification: ``pred`` is ``probabilities`` or of format
    ``classification``; else segmentation. The runtime still checks the kind of what the network returns.
    """
    from pipeline.detection import is_detection_bundle

    outputs = meta.get("network_data_format", {}).get("outputs", {})
    pred = outputs.get("pred") if isinstance(outputs, dict) else None
    pred = pred if isinstance(pred, dict) else {}
    if is_detection_bundle({INFERENCE: json.dumps(config).encode()}) or pred.get("type") == "object":
        return "detection"
    if pred.get("type") == "probabilities" or pred.get("format") == "classification":
        return "classification"
    return "segmentation"


def _target(item: Any) -> str:
    return str(item.get("_target_", "")) if isinstance(item, dict) else str(item)


def _json(bundle: Path, rel: str) -> dict[str, Any]:
    try:
        value = json.loads((bundle / rel).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a MONAI bundle: {rel} is missing") from None
    except ValueError as exc:
        raise BundleError(f"{bundle / rel} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BundleError(f"{bundle / rel} must hold a JSON object")
    return value


def _flag(config: Mapping[str, Any], value: Any, depth: int = 0) -> bool | None:
    """A ``_disabled_`` value as the bundle's own settings make it: a bool, ``@id`` of one, or
    ``$(not @id)``; None when it is an expression this reading does not evaluate."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or depth > 8:
        return None
    if match := re.fullmatch(r"@(\w+)", value.strip()):
        return _flag(config, config.get(match.group(1)), depth + 1)
    if match := re.fullmatch(r"\$\(?\s*not\s+@(\w+)\s*\)?", value.strip()):
        inner = _flag(config, config.get(match.group(1)), depth + 1)
        return None if inner is None else not inner
    return None


def _disabled(config: Mapping[str, Any], item: Any, where: str, name: str) -> BundleItem | None:
    """What a transform's ``_disabled_`` does with the bundle's settings (lung_nodule's Spacingd is
    off unless ``whether_raw_luna16``: a DICOM series then reaches the network at its own spacing)."""
    if not isinstance(item, Mapping) or "_disabled_" not in item or name.rsplit(".", 1)[-1] in _LOADERS:
        return None  # a loader is replaced whether or not the bundle disables it
    raw = item["_disabled_"]
    if isinstance(raw, str) and (ref := re.fullmatch(r"@(\w+)", raw.strip())):
        if isinstance(config.get(ref.group(1)), str):
            raw = f"{raw} = {config[ref.group(1)]}"  # e.g. '@whether_resampled_luna16 = $(not @whether_raw_luna16)'
    flag = _flag(config, item["_disabled_"])
    if flag is False:
        return None
    short = name.rsplit(".", 1)[-1]
    effect = " (the series then reaches the network at its own voxel spacing)" if short == "Spacingd" else ""
    if flag is None:
        return BundleItem(where, "honoured", f"{name}, unless {raw!r} is true{effect}")
    return BundleItem(
        where,
        "disabled",
        f"{name}: not run, `_disabled_` {raw!r} is true in this config{effect}; "
        "an override of that setting runs it",
    )


def _transforms(config: Mapping[str, Any], section: str, channels: tuple[str, ...] = ()) -> list[BundleItem]:
    transforms = config.get(section, {}).get("transforms") if isinstance(config.get(section), dict) else None
    if not isinstance(transforms, list):
        return [BundleItem(section, "honoured", _target(config[section]))] if section in config else []
    items = []
    for index, item in enumerate(transforms):
        name = _target(item)
        short = name.rsplit(".", 1)[-1]
        where = f"{section}#transforms#{index}"
        off = _disabled(config, item, where, name)
        if off is not None and off.action == "disabled":
            items.append(off)
            continue
        if section == "preprocessing" and short in _LOADERS and channels:
            items.append(
                BundleItem(
                    where,
                    "replaced",
                    f"{name} of a channel list ({', '.join(channels)}) -> Identityd: one series per channel, "
                    f"resampled onto {channels[0]}'s grid and stacked in this order (pipeline.multiseries)",
                )
            )
        elif section == "preprocessing" and short in _LOADERS:
            items.append(
                BundleItem(
                    where, "replaced", f"{name} -> Identityd: the volume is fed in memory (LPS MetaTensor)"
                )
            )
        elif section == "postprocessing" and short.startswith("Save"):
            items.append(
                BundleItem(where, "replaced", f"{name} -> Identityd: results go to the SR/SEG writers")
            )
        else:
            items.append(off or BundleItem(where, "honoured", name))
    return items


def describe_bundle(bundle: Path) -> BundleSummary:
    """Parse ``configs/metadata.json`` and ``configs/inference.json`` (as JSON, nothing evaluated)."""
    meta, config = _json(bundle, METADATA), _json(bundle, INFERENCE)
    image_key = config.get("image_key", "image")
    num_channels, channels = input_channels(meta, image_key if isinstance(image_key, str) else "image")
    items: list[BundleItem] = []
    for key in config:
        if key in NEVER_RESOLVED:
            items.append(
                BundleItem(key, "removed", "the service loads data and weights and drives inference itself")
            )
        elif key == "device":
            items.append(BundleItem(key, "overridden", "the worker's device (pipelines.monai device)"))
        elif key == "network_def":
            detail = _target(config[key])
            if isinstance(config[key], dict) and "pretrained" in config[key]:
                items.append(
                    BundleItem("network_def#pretrained", "overridden", "False: no downloads at build time")
                )
            items.append(BundleItem(key, "honoured", detail))
        elif key in ("preprocessing", "postprocessing"):
            items += _transforms(config, key, channels)
        elif key == "inferer":
            items.append(BundleItem(key, "honoured", _target(config[key])))
            if isinstance(config[key], dict) and "device" in config[key]:
                items.append(BundleItem("inferer#device", "overridden", "the worker's device"))
        elif key == "image_key":
            items.append(BundleItem(key, "honoured", "the key the volume is fed under"))
        elif key == "network":
            items.append(
                BundleItem(
                    key, "replaced", "network_def with the pinned weights, moved to the device by the runtime"
                )
            )
        elif key == "modelname":
            items.append(BundleItem(key, "honoured", "chooses the weights file in models/"))
        elif f"@{key}" in _required(config):
            items.append(
                BundleItem(key, "honoured", "evaluated once the network is built (evaluator#_requires_)")
            )
        else:
            items.append(BundleItem(key, "not used", "resolved only where an honoured part refers to it"))
    network = meta.get("network_data_format", {})
    image = network.get("inputs", {}).get("image", {}) if isinstance(network, dict) else {}
    packages = meta.get("required_packages_version") or meta.get("optional_packages_version") or {}
    try:
        labels = channel_names(meta)
    except BundleError:
        labels = ()
    return BundleSummary(
        name=str(meta.get("name") or bundle.name),
        version=str(meta.get("version", "unknown")),
        monai_version=str(meta.get("monai_version", "unknown")),
        declared_packages={str(k): str(v) for k, v in dict(packages).items()},
        labels=labels,
        input_modality=str(image.get("modality", "")).upper() if isinstance(image, dict) else "",
        intended_use=str(meta.get("intended_use", "")),
        items=tuple(items),
        kind=declared_kind(meta, config),
        num_channels=num_channels,
        input_channels=channels,
    )


@dataclass(frozen=True)
class ChannelRule:
    """How the series of one input channel is recognised: a pattern searched in its Series Description."""

    name: str  # the bundle's channel name (channel_def)
    series_description: str  # for SelectionRule.series_description (re.search, case-insensitive)
    why: str  # where the pattern comes from, for the operator


def _word(name: str) -> str:
    """``name`` as a word of its own: no letter or digit either side (``T2`` in "T2_FLAIR", not in "T2W")."""
    return f"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])"


def channel_rules(names: Sequence[str], given: Mapping[str, str]) -> tuple[ChannelRule, ...]:
    """The Series Description pattern of each input channel, in channel order.

    ``given`` (channel name, matched without case -> regular expression, from ``--channel NAME=REGEX``)
    wins; every other channel is found by its name: the description names it as a word, and no other
    channel of the bundle after it, so "T2 FLAIR" is FLAIR's and not T2's. Patterns are searched without
    case. ValueError names an unknown channel or a pattern that is not a regular expression.
    """
    by_fold = {n.casefold(): n for n in names}
    chosen: dict[str, str] = {}
    for key, pattern in given.items():
        name = by_fold.get(key.strip().casefold())
        if name is None:
            raise ValueError(
                f"--channel {key}=...: the bundle has no channel {key!r} (it takes {', '.join(names)})"
            )
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"--channel {key}={pattern}: not a regular expression: {exc}") from exc
        chosen[name] = pattern
    rules = []
    for name in names:
        if name in chosen:
            rules.append(ChannelRule(name, f"(?i){chosen[name]}", f"--channel {name}={chosen[name]}"))
            continue
        others = "|".join(re.escape(n) for n in names if n != name)
        rules.append(
            ChannelRule(
                name,
                f"(?i){_word(name)}(?!.*(?<![a-z0-9])(?:{others})(?![a-z0-9]))",
                f"by name: its Series Description names {name!r} as a word, and no other channel after it",
            )
        )
    return tuple(rules)


def _required(config: Mapping[str, Any]) -> list[str]:
    """What the bundle's evaluator requires before it runs (``_requires_``), as ``@id`` references."""
    evaluator = config.get("evaluator")
    requires = evaluator.get("_requires_") if isinstance(evaluator, dict) else None
    return [requires] if isinstance(requires, str) else [r for r in requires or [] if isinstance(r, str)]


@dataclass(frozen=True)
class WeightHash:
    """A weights file the bundle's ``large_files.yml`` lists, and whether the file here matches it."""

    path: str
    hash_type: str
    expected: str
    actual: str | None  # None: the file is not here

    @property
    def ok(self) -> bool:
        return self.actual is not None and self.actual == self.expected.lower()


_ENTRY = re.compile(r"-\s*path:\s*\"?([^\"\n]+)\"?\s*\n(?:\s+\w+:.*\n?)*", re.MULTILINE)


def weight_hashes(bundle: Path) -> tuple[WeightHash, ...]:
    """The hashes ``large_files.yml`` (or ``.yaml``) declares, checked against the files present."""
    listing = next(
        (p for p in (bundle / "large_files.yml", bundle / "large_files.yaml") if p.is_file()), None
    )
    if listing is None:
        return ()
    out = []
    for match in _ENTRY.finditer(listing.read_text(encoding="utf-8")):
        block = match.group(0)
        rel = match.group(1).strip()
        value = re.search(r"hash_val:\s*\"?([0-9a-fA-F]+)", block)
        kind = re.search(r"hash_type:\s*\"?(\w+)", block)
        if value is None:
            continue
        algorithm = (kind.group(1) if kind else "md5").lower()
        path = bundle / rel
        actual = None
        if path.is_file() and algorithm in hashlib.algorithms_available:
            actual = hashlib.new(algorithm, path.read_bytes()).hexdigest()
        out.append(WeightHash(rel, algorithm, value.group(1), actual))
    return tuple(out)


def random_weights_copy(
    bundle: Path, target: Path, *, seed: int = 0, overrides: Mapping[str, Any] | None = None
) -> Path:
    """Copy the bundle's configs to ``target`` and give it random weights (seeded) for its network_def.

    The copy is a bundle of its own (pin it with ``bundle_sha256``); the original is never written.
    """
    import torch

    from pipeline.bundle_config import build_parser
    from pipeline.detection import detection_build

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle / "configs", target / "configs")
    if (bundle / "scripts").is_dir():
        shutil.copytree(bundle / "scripts", target / "scripts")
    files = {f"configs/{p.name}": p.read_bytes() for p in (target / "configs").glob("*.json")}
    parser = build_parser(files, overrides or {}, torch.device("cpu"))
    try:
        name = parser.get_parsed_content("modelname") if "modelname" in parser else "model.pt"
        torch.manual_seed(seed)
        with detection_build(files):  # a detector's torchvision stand-ins (pipeline.detection_compat)
            network = parser.get_parsed_content("network_def")
    except (KeyError, ValueError, TypeError, AttributeError, ImportError, RuntimeError, SyntaxError) as exc:
        raise BundleError(f"bundle {bundle}: network_def could not be built: {exc}") from exc
    if not isinstance(network, torch.nn.Module):
        raise BundleError(
            f"bundle {bundle}: network_def built a {type(network).__name__}, not a torch.nn.Module"
        )
    (target / "models").mkdir()
    torch.save(network.state_dict(), target / "models" / str(name))
    return target
